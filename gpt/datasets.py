"""The corpora the toolkit knows by name: where each is downloaded from and the sha256 it must have.

Imports nothing heavy: the config validates `data.dataset` against it, and gpt.data downloads from it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
