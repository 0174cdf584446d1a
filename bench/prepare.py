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

With --formats (the default for the first size), the same documents are also written as parquet
(one file per folder of 50, a row per document) and as .jsonl.zst (a line per document), and each
is prepared the same way: MB/s of text against the .txt files (goals: parquet >= 0.9x, .jsonl.zst
>= 0.8x) and peak RSS (goal: under 1 GB each).
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


def other_formats(corpus: Path, out: Path) -> dict[str, Path]:
    """The documents of the .txt corpus as parquet and as .jsonl.zst, a file per folder of 50."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folders = {"parquet": out / "parquet", "jsonl.zst": out / "jsonl_zst"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for part in sorted(p for p in corpus.iterdir() if p.is_dir()):
        texts = [f.read_text(encoding="utf-8") for f in sorted(part.glob("*.txt"))]
        pq.write_table(pa.table({"text": texts}), folders["parquet"] / f"{part.name}.parquet", row_group_size=8)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        (folders["jsonl.zst"] / f"{part.name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    return folders


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
    parser.add_argument("--no-formats", action="store_true", help="skip the parquet and .jsonl.zst comparison")
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
            if k == 0 and not args.no_formats:
                for name, folder in other_formats(corpus, tmp / f"formats{megabytes}").items():
                    f_seconds, f_peak, _ = toolkit(folder, tokenizer_json, tmp / f"cache-{name}")
                    print(f"  the same documents as {name}: {size / f_seconds:.2f} MB/s of text ({f_seconds:.0f} s), "
                          f"{f_peak:,.0f} MB peak RSS; {seconds / f_seconds:.2f}x the .txt files' MB/s", flush=True)
            for path in files:  # make room for the next size
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(run())
