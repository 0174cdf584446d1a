"""Text in, batches of token windows out.

1. Find the corpus: `data.path` (gpt.corpus.find_files), else a named dataset (gpt.datasets: the
   `$GPT_DATA_DIR` copy, the user cache, or a checked download).
2. prepare(): tokenize it once into memory-mapped shards in the cache (uint16 when the vocabulary
   fits, else uint32), keyed by the content and the tokenizer settings, so a corpus larger than
   memory works and later runs start at once. The split follows gpt.corpus's plan.
3. get_batch(): draw batches of random windows. Which windows is a pure function of (seed, split,
   step, shard), so a resumed run, or the same global batch split over a different number of
   processes, sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt.config import DataConfig
from gpt.corpus import (
    CorpusError,
    ShardedTokens,
    ShardWriter,
    SplitPlan,
    find_files,
    plan_split,
    safe_pieces,
    split_text,
)
from gpt.datasets import DataError, cache_dir, resolve_corpus
from gpt.files import publish_folder, sha256_file, staging, waiting_lock
from gpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

TOKENS_FORMAT = 2


@dataclass
class TokenizedCorpus:
    """The corpus as memory-mapped token shards, split into train and val."""

    tokenizer: Tokenizer
    train: np.ndarray | ShardedTokens  # (N_train,) uint16 or uint32
    val: np.ndarray | ShardedTokens  # (N_val,)
    sha256: str = ""  # of the text and the tokenizer settings: a resumed run checks it has not changed
    stats: dict = field(default_factory=dict)  # per split: tokens, bytes, documents; what was skipped

    def split(self, name: str) -> np.ndarray | ShardedTokens:
        return self.train if name == "train" else self.val

    def bytes_per_token(self, split: str = "val") -> float | None:
        """UTF-8 bytes per token of a split: turns a loss in nats per token into bits per byte."""
        s = self.stats.get("splits", {}).get(split, {})
        return s["bytes"] / s["tokens"] if s.get("tokens") else None


def bits_per_byte(loss_nats: float, bytes_per_token: float | None) -> float | None:
    """A loss that compares tokenizers: nats per token over ln 2, spread over the bytes a token covers."""
    return None if not bytes_per_token else loss_nats / math.log(2) / bytes_per_token


def corpus_files(config: DataConfig, url: str | None = None) -> tuple[list[Path], Path]:
    """The files to read and the folder their names are relative to."""
    if config.path is None:
        path = resolve_corpus(config, url)
        return [path], path.parent
    try:
        return find_files(config.path)
    except CorpusError as e:
        raise DataError(str(e)) from None


def fingerprint(files: list[Path], root: Path, config: DataConfig) -> str:
    """The cache key: every file's name and content, and every setting that changes the tokens."""
    h = hashlib.sha256()
    settings = {"format": TOKENS_FORMAT, "tokenizer": config.tokenizer, "val_fraction": config.val_fraction,
                "skip_bad_files": config.skip_bad_files, "text_field": config.text_field}
    if config.tokenizer == "bpe":
        if config.tokenizer_file:
            settings["tokenizer_file"] = sha256_file(_tokenizer_file(config))
        else:
            settings |= {"vocab_size": config.vocab_size, "sample_mb": config.tokenizer_sample_mb}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        h.update(str(path.relative_to(root) if path.is_relative_to(root) else path).encode() + b"\0")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def _tokenizer_file(config: DataConfig) -> Path:
    path = Path(config.tokenizer_file).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer_file={config.tokenizer_file} does not exist: point it at a tokenizer.json "
                        "(Hugging Face tokenizers format, e.g. GPT-2's)")
    return path


def prepare(config: DataConfig, url: str | None = None, progress: bool | None = None) -> TokenizedCorpus:
    """Tokenize the corpus into the cache (once) and map it back in.

    The cache entry is keyed by the corpus' content and the tokenizer settings, so a changed file or
    tokenizer prepares again. It is built in a temporary folder, flushed to disk and renamed, so a
    killed run or a power cut never leaves a half entry. Processes that call it together (the ranks
    of a run) take turns on a lock in the cache: the first prepares, the others then find the entry.
    """
    with waiting_lock(cache_dir() / "prepare.lock"):
        files, root = corpus_files(config, url)
        key = fingerprint(files, root, config)
        entry = cache_dir() / "tokens" / key[:24]
        if not (entry / "index.json").is_file():
            with staging(entry) as tmp:
                try:
                    _build(files, root, config, tmp, progress)
                except CorpusError as e:
                    raise DataError(str(e)) from None
                publish_folder(tmp, entry, replace=True)
        return _load(entry, key)


def _load(entry: Path, key: str) -> TokenizedCorpus:
    index = json.loads((entry / "index.json").read_text())
    if index.get("format") != TOKENS_FORMAT:  # the key includes the format, so only a damaged entry gets here
        raise DataError(f"{entry} is token format {index.get('format')!r}, this build reads {TOKENS_FORMAT}: delete "
                        "the folder and it is prepared again")
    tokenizer = load_tokenizer(entry / "tokenizer.json")
    dtype = np.dtype(index["dtype"])
    splits = {}
    for split in ("train", "val"):
        arrays = [np.memmap(entry / name, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
                  for name, n in index["splits"][split]["shards"]]
        splits[split] = arrays[0] if len(arrays) == 1 else ShardedTokens(arrays) if arrays else np.zeros(0, dtype)
    return TokenizedCorpus(tokenizer, splits["train"], splits["val"], key, index)


def _make_tokenizer(files: list[Path], root: Path, config: DataConfig, plan: SplitPlan) -> Tokenizer:
    if config.tokenizer == "char":
        return CharTokenizer(plan.chars_set)
    if config.tokenizer_file:
        try:
            tokenizer = load_tokenizer(_tokenizer_file(config))
        except ValueError as e:
            raise DataError(f"data.tokenizer_file={config.tokenizer_file}: {e}") from None
        if not isinstance(tokenizer, BPETokenizer):
            raise DataError(f"data.tokenizer_file={config.tokenizer_file} is a char vocabulary: give a Hugging Face "
                            "tokenizer.json, or use data.tokenizer=char")
        return tokenizer
    budget = config.tokenizer_sample_mb << 20

    def train_text():  # the training split only, up to the sample budget
        used = 0
        for split, chunk in split_text(files, root, config.skip_bad_files, plan, config.text_field):
            if split == "train" and chunk:
                yield chunk
                used += len(chunk)
                if used >= budget:
                    return
    return BPETokenizer.train(train_text(), config.vocab_size)


def _build(files: list[Path], root: Path, config: DataConfig, folder: Path, progress: bool | None) -> None:
    """Scan, make the tokenizer, tokenize into shards, write index.json last."""
    plan = plan_split(files, root, config.val_fraction, config.skip_bad_files, config.tokenizer == "char",
                      config.text_field)
    tokenizer = _make_tokenizer(files, root, config, plan)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: ShardWriter(folder, split, dtype) for split in ("train", "val")}
    counts = {split: {"bytes": 0, "documents": 0} for split in ("train", "val")}
    total = sum(p.stat().st_size for p in files)
    with _Progress(total, progress) as bar:
        if isinstance(tokenizer, CharTokenizer):
            codepoints = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)  # sorted, as the ids
            for split, chunk in split_text(files, root, config.skip_bad_files, plan, config.text_field):
                if chunk is None:
                    counts[split]["documents"] += 1
                    continue
                data = chunk.encode("utf-8")
                counts[split]["bytes"] += len(data)
                points = np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)
                writers[split].write(np.searchsorted(codepoints, points).astype(dtype))
                bar.advance(len(data))
        else:
            chunks = split_text(files, root, config.skip_bad_files, plan, config.text_field)
            _encode_bpe(tokenizer, chunks, writers, counts, bar)
    for w in writers.values():
        w.close()
    skipped = plan.skipped
    index = {"format": TOKENS_FORMAT, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
             "dtype": dtype.name, "files": len(files), "root": str(root),
             "splits": {s: {"shards": writers[s].shards, "tokens": writers[s].tokens, **counts[s]} for s in writers},
             "skipped": {k: len(v) for k, v in vars(skipped).items()},
             "skipped_examples": {k: v[:5] for k, v in vars(skipped).items() if v}}
    tokenizer.save(folder / "tokenizer.json")
    (folder / "index.json").write_text(json.dumps(index, indent=2))  # written last: marks the entry complete


def _encode_bpe(tokenizer: BPETokenizer, chunks, writers, counts, bar, batch_bytes: int = 4 << 20) -> None:
    """Byte-level BPE on all cores: pieces cut where the pre-tokenizer cuts, encoded in large batches."""
    pending: list[tuple[str, str | None]] = []  # (split, piece), or (split, None) for a document's end
    size = 0
    carry = {"train": "", "val": ""}

    def flush():
        texts = [t for _, t in pending if t is not None]
        encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
        for split, piece in pending:
            if piece is None:
                if tokenizer.eot_id is not None:
                    writers[split].write(np.array([tokenizer.eot_id]))
            else:
                writers[split].write(np.asarray(next(encoded), dtype=np.int64))
        pending.clear()

    for split, chunk in chunks:
        if chunk is None:  # the document (or its train part) ends: encode what is carried, then EOT
            if carry[split]:
                pending.append((split, carry[split]))
                carry[split] = ""
            pending.append((split, None))
            counts[split]["documents"] += 1
        else:
            n = len(chunk.encode("utf-8"))
            counts[split]["bytes"] += n
            bar.advance(n)
            pieces, carry[split] = safe_pieces(chunk, carry[split])
            pending.extend((split, p) for p in pieces)
            size += n
        if size >= batch_bytes:
            flush()
            size = 0
    flush()


class _Progress:
    """A rich progress bar (MB, MB/s, ETA) on a terminal; nothing elsewhere."""

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.enabled = total, sys.stderr.isatty() if enabled is None else enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("tokenize", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


SPLIT_IDS = {"train": 0, "val": 1}


def require_windows(data, block_size: int, split: str) -> None:
    """A split must hold at least one window of block_size + 1 tokens (inputs and their targets)."""
    if len(data) <= block_size:
        raise DataError(
            f"the {split} split has {len(data)} tokens, not more than block_size={block_size}: "
            "use a longer text, a smaller model.block_size or another data.val_fraction"
        )


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, seed: int, split: str, step: int, shard: int,
    evaluation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs x and next-token targets y, both (B, T) int64.

    The window starts depend only on (seed, split, step, shard); evaluation batches (step = the
    evaluation batch index) come from a stream of their own and are the same at every evaluation.
    A shard is one micro-batch of one process: shard = micro_step * world_size + rank, so the
    global batch of a step is the same set of windows whether it is split over 2 processes or
    accumulated in 2 micro-steps on one.
    """
    require_windows(data, block_size, split)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], int(evaluation), step, shard])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts])
    xy = torch.from_numpy(windows)
    return xy[:, :-1], xy[:, 1:]


def main(argv: list[str] | None = None) -> int:
    """python -m gpt.data prepare CONFIG [--data.key=value ...]: prepare a run's corpus ahead of training."""
    import argparse

    from gpt.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m gpt.data", description="Prepare a run config's corpus once: "
                                     "find its files, train or load the tokenizer, tokenize on all cores into "
                                     "memory-mapped shards in the cache. Training reuses the result.")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="tokenize the corpus of a run config into the cache",
                               epilog="Overrides: any --section.key=value, e.g. --data.path=corpus/ "
                               "--data.tokenizer=bpe --data.vocab_size=16384")
    prep.add_argument("config", help="YAML run config, e.g. configs/shakespeare_bpe_cpu.yaml")
    args, overrides = parser.parse_known_args(argv)
    from gpt.cli import run_command

    return run_command(lambda: prepare_and_report(args.config, overrides), (ConfigError, DataError))


def prepare_and_report(config_path: str, overrides: list[str]) -> None:
    from gpt.config import load_run_config

    config = load_run_config(config_path, overrides)
    started = time.perf_counter()
    corpus = prepare(config.data)
    index = corpus.stats
    print(f"{index['tokenizer']} tokenizer, vocabulary {index['vocab_size']:,}; {index['files']} file(s) under "
          f"{index['root']} ({time.perf_counter() - started:.1f} s, cache entry {corpus.sha256[:24]})")
    for split, s in index["splits"].items():
        ratio = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
        print(f"  {split}: {s['documents']:,} documents, {s['bytes']:,} bytes, {s['tokens']:,} tokens "
              f"({ratio:.2f} bytes per token) in {len(s['shards'])} shard(s)")
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in index["skipped"].items() if n) or "nothing"
    print(f"  skipped: {skipped}")


if __name__ == "__main__":
    sys.exit(main())
