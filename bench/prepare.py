"""Preparing a corpus of many files: the toolkit's prepare against a plain tokenizers loop, and its memory.

    python bench/prepare.py                      # 200 MB and 1 GB corpora, about 10 minutes on 2 cores
    python bench/prepare.py --sizes-mb 200       # only the first

The corpus is built from TinyShakespeare on this machine (`$GPT_DATA_DIR`, or the cache): file i is
the play's lines in an order shuffled with seed i, so no two files are alike, about 1.1 MB each, in
nested folders of 50. Both sides use the same byte-level BPE tokenizer (vocabulary 8,192, learned
once from TinyShakespeare), so they produce the same tokens and the timing compares tokenization:

    baseline   one process, `tokenizers.Tokenizer.encode` on each whole file, tokens into a list
    toolkit    `python -m gpt.data prepare` (hash the files, scan them, encode on all cores in
               batches of pieces, write uint16 shards), in a child process whose peak RSS is read

It prints MB/s of each and the ratio (goal >= 1.6x on 2 cores), and the toolkit's peak RSS for
each corpus size (goal: under 1 GB and not growing with the corpus).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_corpus(folder: Path, source: str, megabytes: int) -> int:
    lines = source.splitlines(keepends=True)
    total, i = 0, 0
    while total < megabytes << 20:
        random.Random(i).shuffle(lines)
        path = folder / f"part{i // 50:03d}" / f"file{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(lines).encode("utf-8")
        path.write_bytes(data)
        total, i = total + len(data), i + 1
    return i


def baseline(files: list[Path], tokenizer_json: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    start, tokens = time.perf_counter(), 0
    for path in files:
        tokens += len(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids)
    return time.perf_counter() - start, tokens


def toolkit(corpus: Path, tokenizer_json: Path, cache: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, output) of `python -m gpt.data prepare` in a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPT_CACHE_DIR": str(cache)}
    argv = ["prepare", str(ROOT / "configs" / "tiny.yaml"), f"--data.path={corpus}", "--data.tokenizer=bpe",
            f"--data.tokenizer_file={tokenizer_json}", "--data.val_fraction=0.01"]
    # the child reports its own peak resident set (VmHWM) as it ends
    code = (f"import sys; from gpt.data import main; rc = main({argv!r}); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('PEAK_KB', hwm, file=sys.stderr); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak_kb = int(proc.stderr.split("PEAK_KB")[-1].split()[0])
    return seconds, peak_kb / 1024, proc.stdout


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--dir", default=None, help="where to build the corpora (default: a temporary folder)")
    args = parser.parse_args(argv)

    from gpt.config import DataConfig
    from gpt.data import resolve_corpus
    from gpt.tokenizer import BPETokenizer

    source = resolve_corpus(DataConfig()).read_text(encoding="utf-8")
    from bench.common import machine

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        tokenizer_json = tmp / "tokenizer.json"
        BPETokenizer.train([source], 8192).save(tokenizer_json)
        for k, megabytes in enumerate(args.sizes_mb):
            corpus = tmp / f"corpus{megabytes}"
            n = build_corpus(corpus, source, megabytes)
            files = sorted(corpus.rglob("*.txt"))
            size = sum(p.stat().st_size for p in files) / 1e6
            seconds, peak, out = toolkit(corpus, tokenizer_json, tmp / f"cache{megabytes}")
            line = f"{size:,.0f} MB in {n} files: toolkit prepare {size / seconds:.2f} MB/s ({seconds:.0f} s), " \
                   f"peak RSS {peak:,.0f} MB"
            if k == 0:
                base_s, base_tokens = baseline(files, tokenizer_json)
                line += f"; single-process encode loop {size / base_s:.2f} MB/s ({base_s:.0f} s, " \
                        f"{base_tokens:,} tokens); ratio {base_s / seconds:.2f}x"
            print(line, flush=True)
            print("  " + out.strip().replace("\n", "\n  "), flush=True)
            for path in files:  # make room for the next size
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(run())
