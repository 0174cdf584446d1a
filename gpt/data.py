"""Text in, batches of token windows out.

1. Find the corpus: `data.path`, else `$GPT_DATA_DIR/tinyshakespeare/input.txt`, else the user
   cache; if none is there, download it with requests, check its sha256 and move it into place.
2. Tokenize it once into a uint16 file in the cache, read back memory-mapped, so a corpus larger
   than memory works and later runs start at once.
3. Draw batches of random windows. Which windows is a pure function of (seed, split, step, shard),
   so a resumed run, or the same global batch split over a different number of processes, sees
   exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt.config import DataConfig
from gpt.corpus import (
    CorpusError,
    ShardedTokens,
    ShardWriter,
    Skipped,
    documents,
    find_files,
    in_val,
    name_hash,
    safe_pieces,
)
from gpt.datasets import DATASETS
from gpt.files import fsync_path, publish_folder, waiting_lock
from gpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

TOKENS_FORMAT = 2


class DataError(RuntimeError):
    """The corpus cannot be found, fetched or used. The message says what to do."""


def cache_dir() -> Path:
    """Where downloads and token files live: $GPT_CACHE_DIR, else $XDG_CACHE_HOME/gpt, else ~/.cache/gpt."""
    if os.environ.get("GPT_CACHE_DIR"):
        return Path(os.environ["GPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, retries: int = 3, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest`, verified against `sha256`, written atomically (temp file + rename)."""
    import requests  # only needed when something must be downloaded

    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(1, retries + 1):
        try:
            response = requests.get(url, timeout=timeout)
            response.raise_for_status()
            body = response.content
        except requests.RequestException as e:
            last_error = f"{type(e).__name__}: {e}"
            if attempt < retries:
                time.sleep(min(2.0 ** (attempt - 1), 8.0))
            continue
        digest = hashlib.sha256(body).hexdigest()
        if digest != sha256:
            raise DataError(
                f"downloaded {url} has sha256 {digest}, expected {sha256}: the file is corrupt or changed; "
                f"put a good copy at {dest} by hand"
            )
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        return dest
    raise DataError(
        f"could not download {url} after {retries} tries ({last_error}); offline? put the file at {dest}, "
        f"or set GPT_DATA_DIR to a folder holding tinyshakespeare/input.txt, or set data.path"
    )


def resolve_corpus(config: DataConfig, url: str | None = None) -> Path:
    """The file of a named dataset (gpt.datasets): $GPT_DATA_DIR's copy, the cache's, or a download,
    each checked against the registry's sha256."""
    name = config.dataset
    dataset = DATASETS[name]
    candidates = []
    if os.environ.get("GPT_DATA_DIR"):
        candidates.append(Path(os.environ["GPT_DATA_DIR"]) / name / dataset.filename)
    cached = cache_dir() / "datasets" / name / dataset.filename
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            digest = sha256_file(path)
            if digest != dataset.sha256:
                raise DataError(
                    f"{path} has sha256 {digest}, expected {dataset.sha256}: "
                    "delete it to download a fresh copy, or set data.path to use it as your own text"
                )
            return path
    mirror = os.environ.get(f"GPT_{name.upper()}_URL")  # e.g. GPT_TINYSHAKESPEARE_URL, for a local mirror
    return download(url or mirror or dataset.url, cached, dataset.sha256)


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
                "skip_bad_files": config.skip_bad_files}
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
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                _build(files, root, config, tmp, progress)
                publish_folder(tmp, entry, replace=True)
            except CorpusError as e:
                raise DataError(str(e)) from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
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


def _scan(files: list[Path], root: Path, config: DataConfig) -> dict:
    """The first pass: count documents and characters, collect the character set, plan the split."""
    skipped = Skipped()
    chars: set[str] = set()
    n_docs = n_chars = n_val = 0
    lowest = highest = None  # (hash, name) of the documents first and last in hash order
    for doc in documents(files, root, config.skip_bad_files, skipped):
        n_docs += 1
        for chunk in doc.text_chunks:
            n_chars += len(chunk)
            if config.tokenizer == "char":
                chars.update(chunk)
        n_val += in_val(doc.name, config.val_fraction)
        key = (name_hash(doc.name), doc.name)
        lowest, highest = min(lowest or key, key), max(highest or key, key)
    if n_docs == 0:
        raise DataError(f"{root} has no text to train on: {len(files)} file(s), skipped {skipped.summary()}")
    plan = {"documents": n_docs, "chars": n_chars, "chars_set": chars, "skipped": skipped,
            "single": n_docs == 1, "force_val": None, "force_train": None}
    if n_docs == 1:  # the tutorial's split: the tail of the one text
        plan["split_at"] = n_chars - int(n_chars * config.val_fraction)
    elif n_val == 0:  # every split needs a document
        plan["force_val"] = lowest[1]
    elif n_val == n_docs:
        plan["force_train"] = highest[1]
    return plan


def _split_of(name: str, plan: dict, val_fraction: float) -> str:
    if name == plan["force_val"]:
        return "val"
    if name == plan["force_train"]:
        return "train"
    return "val" if in_val(name, val_fraction) else "train"


def _split_text(files, root, config, plan) -> Iterator[tuple[str, str | None]]:
    """(split, text chunk) for every chunk of every document, then (split, None) at each document's end."""
    for doc in documents(files, root, config.skip_bad_files):
        if plan["single"]:
            seen, train_ended = 0, False
            for chunk in doc.text_chunks:
                cut = min(max(plan["split_at"] - seen, 0), len(chunk))
                if cut:
                    yield "train", chunk[:cut]
                if cut < len(chunk):
                    if not train_ended and plan["split_at"] > 0:
                        yield "train", None  # the train part ends here (mid-chunk or at a chunk's start)
                    train_ended = True
                    yield "val", chunk[cut:]
                seen += len(chunk)
            yield ("val" if train_ended else "train"), None
        else:
            split = _split_of(doc.name, plan, config.val_fraction)
            for chunk in doc.text_chunks:
                yield split, chunk
            yield split, None


def _make_tokenizer(files, root, config, plan) -> Tokenizer:
    if config.tokenizer == "char":
        return CharTokenizer(plan["chars_set"])
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
        for split, chunk in _split_text(files, root, config, plan):
            if split == "train" and chunk:
                yield chunk
                used += len(chunk)
                if used >= budget:
                    return
    return BPETokenizer.train(train_text(), config.vocab_size)


def _build(files: list[Path], root: Path, config: DataConfig, folder: Path, progress: bool | None) -> None:
    """Scan, make the tokenizer, tokenize into shards, write index.json last."""
    plan = _scan(files, root, config)
    tokenizer = _make_tokenizer(files, root, config, plan)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: ShardWriter(folder, split, dtype) for split in ("train", "val")}
    counts = {split: {"bytes": 0, "documents": 0} for split in ("train", "val")}
    total = sum(p.stat().st_size for p in files)
    with _Progress(total, progress) as bar:
        if isinstance(tokenizer, CharTokenizer):
            codepoints = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)  # sorted, as the ids
            for split, chunk in _split_text(files, root, config, plan):
                if chunk is None:
                    counts[split]["documents"] += 1
                    continue
                data = chunk.encode("utf-8")
                counts[split]["bytes"] += len(data)
                points = np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)
                writers[split].write(np.searchsorted(codepoints, points).astype(dtype))
                bar.advance(len(data))
        else:
            _encode_bpe(tokenizer, _split_text(files, root, config, plan), writers, counts, bar)
    for w in writers.values():
        w.close()
    skipped = plan["skipped"]
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
    if len(data) <= block_size:
        raise DataError(
            f"the {split} split has {len(data)} tokens, fewer than block_size+1={block_size + 1}: "
            "use a longer text, a smaller model.block_size, or a different data.val_fraction"
        )
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
