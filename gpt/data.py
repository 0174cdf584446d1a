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
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.config import DataConfig
from gpt.files import fsync_path, waiting_lock
from gpt.tokenizer import CharTokenizer

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TOKENS_FORMAT = 1
_CHUNK_CHARS = 1 << 24  # read and tokenize 16M characters at a time


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
    """The path of the text file to train on, downloading TinyShakespeare if it is nowhere local."""
    if config.path is not None:
        path = Path(config.path).expanduser()
        if not path.is_file():
            raise DataError(f"data.path={config.path} does not exist: point it at a UTF-8 text file")
        return path
    name = config.dataset
    candidates = []
    if os.environ.get("GPT_DATA_DIR"):
        candidates.append(Path(os.environ["GPT_DATA_DIR"]) / name / "input.txt")
    cached = cache_dir() / "datasets" / name / "input.txt"
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            digest = sha256_file(path)
            if digest != TINYSHAKESPEARE_SHA256:
                raise DataError(
                    f"{path} has sha256 {digest}, expected {TINYSHAKESPEARE_SHA256}: "
                    "delete it to download a fresh copy, or set data.path to use it as your own text"
                )
            return path
    return download(url or os.environ.get("GPT_TINYSHAKESPEARE_URL") or TINYSHAKESPEARE_URL,
                    cached, TINYSHAKESPEARE_SHA256)


@dataclass
class TokenizedCorpus:
    """The corpus as one memory-mapped uint16 array, split into train and val views."""

    tokenizer: CharTokenizer
    train: np.ndarray  # (N_train,) uint16
    val: np.ndarray  # (N_val,) uint16
    sha256: str = ""  # of the text it was made from: a resumed run checks it has not changed

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


def _scan_vocabulary(path: Path) -> tuple[set[str], int]:
    chars: set[str] = set()
    n = 0
    with open(path, encoding="utf-8") as f:
        for chunk in iter(lambda: f.read(_CHUNK_CHARS), ""):
            chars.update(chunk)
            n += len(chunk)
    return chars, n


def prepare(config: DataConfig, url: str | None = None) -> TokenizedCorpus:
    """Tokenize the corpus into the cache (once) and map it back in.

    The cache entry is keyed by the text's sha256, so editing the text makes a new entry. Files are
    written under a temporary name, flushed to disk and renamed, so a killed run or a power cut never
    leaves a half entry. Processes that call it together (the ranks of a run) take turns on a lock
    in the cache: the first downloads and tokenizes, the others then find the entry ready.
    """
    with waiting_lock(cache_dir() / "prepare.lock"):
        return _prepare(config, url)


def _prepare(config: DataConfig, url: str | None) -> TokenizedCorpus:
    corpus = resolve_corpus(config, url)
    digest = sha256_file(corpus)
    entry = cache_dir() / "tokens" / digest[:24]
    tokens_path, vocab_path = entry / "tokens.u16", entry / "tokenizer.json"
    if not (tokens_path.is_file() and vocab_path.is_file()):
        try:
            chars, n = _scan_vocabulary(corpus)
        except UnicodeDecodeError as e:
            raise DataError(f"{corpus} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None
        if n == 0:
            raise DataError(f"{corpus} is empty: train on a text file with content")
        if len(chars) > 65536:
            raise DataError(f"{corpus} has {len(chars)} distinct characters; a uint16 token file holds at most 65536")
        tokenizer = CharTokenizer(chars)
        entry.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".tokens-")
        stoi = tokenizer.stoi
        with os.fdopen(fd, "wb") as out, open(corpus, encoding="utf-8") as f:
            for chunk in iter(lambda: f.read(_CHUNK_CHARS), ""):
                np.fromiter((stoi[c] for c in chunk), dtype=np.uint16, count=len(chunk)).tofile(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, tokens_path)
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".tokenizer-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**tokenizer.to_dict(), "tokens_format": TOKENS_FORMAT, "source": str(corpus)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vocab_path)  # the tokenizer file last: its presence marks the entry complete
        fsync_path(entry)
    tokenizer = CharTokenizer.load(vocab_path)
    data = np.memmap(tokens_path, dtype=np.uint16, mode="r")
    n_val = int(len(data) * config.val_fraction)
    return TokenizedCorpus(tokenizer, data[: len(data) - n_val], data[len(data) - n_val:], digest)


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
