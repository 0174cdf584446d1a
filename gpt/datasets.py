"""The corpora the toolkit knows by name, and how one is found: `$GPT_DATA_DIR`'s copy, the cache's,
or a download, each checked against the sha256 the registry records.

Imports nothing heavy: the config validates `data.dataset` against DATASETS, and gpt.data reads the
file resolve_corpus() returns.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from gpt.files import sha256_file, write_atomic


class DataError(RuntimeError):
    """The corpus cannot be found, fetched or used. The message says what to do."""


@dataclass(frozen=True)
class Dataset:
    url: str
    sha256: str
    filename: str = "input.txt"  # the name under $GPT_DATA_DIR/NAME/ and the cache's datasets/NAME/


DATASETS = {
    "tinyshakespeare": Dataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


def cache_dir() -> Path:
    """Where downloads and token files live: $GPT_CACHE_DIR, else $XDG_CACHE_HOME/gpt, else ~/.cache/gpt."""
    if os.environ.get("GPT_CACHE_DIR"):
        return Path(os.environ["GPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt"


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
        write_atomic(dest, body)
        return dest
    raise DataError(
        f"could not download {url} after {retries} tries ({last_error}); offline? put the file at {dest}, "
        f"or set GPT_DATA_DIR to a folder holding tinyshakespeare/input.txt, or set data.path"
    )


def resolve_corpus(config, url: str | None = None) -> Path:
    """The file of the named dataset of a DataConfig (`config.dataset`): $GPT_DATA_DIR's copy, the
    cache's, or a download, each checked against the registry's sha256."""
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
