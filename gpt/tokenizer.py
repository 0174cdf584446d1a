"""Character-level tokenizer: one token per distinct character of the training text.

Imports no torch, so serving can use it. Saved as JSON: {"type": "char", "version": 1, "chars": [...]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

FORMAT_VERSION = 1


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an integer id, in sorted order."""

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("tokenizer vocabulary is empty: build it from a non-empty text")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("tokenizer vocabulary entries must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[tuple[int, str]]:
        """(position, character) for each character of `text` outside the vocabulary."""
        return [(i, c) for i, c in enumerate(text) if c not in self.stoi]

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            bad = self.unknown(text)
            shown = ", ".join(f"{c!r} at position {i}" for i, c in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ValueError(
                f"text has {len(bad)} character(s) outside the vocabulary: {shown}{more}; "
                f"the model knows only the {self.vocab_size} characters of its training text"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise ValueError(f"token id(s) {bad[:5]} out of range [0, {self.vocab_size})") from None

    def to_dict(self) -> dict:
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        if data.get("type") != "char" or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"tokenizer is type={data.get('type')!r} version={data.get('version')!r}; this build reads "
                f"type='char' version={FORMAT_VERSION}: re-export with this version of gpt"
            )
        return cls(data["chars"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars
