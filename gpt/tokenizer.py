"""Tokenizers: text to integer ids and back, behind one interface.

    CharTokenizer   one token per distinct character of the training text (the tutorial's);
                    saved as {"type": "char", "version": 1, "chars": [...]}
    BPETokenizer    byte-level BPE from Hugging Face `tokenizers`, trained on the corpus or read
                    from any tokenizer.json (GPT-2's, say); saved in that library's own format

Both give `encode`, `decode`, `vocab_size`, `eot_id` (the end-of-document token, or None),
`token_bytes` (the UTF-8 bytes each id stands for) and `stream()`, a decoder that turns ids into
text one at a time and hands out only complete characters: a byte-level token can end in the
middle of a UTF-8 character.

Special tokens (a chat template's markers, gpt.chat) are ids of their own after the vocabulary:
`with_special_tokens` adds them, and a text that contains one encodes it as that one id. A
tokenizer may carry a chat template (`chat`, a gpt.chat.ChatTemplate): it is saved beside
tokenizer.json in tokenizer_config.json, Hugging Face's place for it, and read back from there.

Imports no torch, so serving can use it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

FORMAT_VERSION = 1
EOT = "<|endoftext|>"  # the end-of-document token, as GPT-2 names it


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an integer id, in sorted order."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: Iterable[str], special_tokens: Sequence[str] = ()):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("tokenizer vocabulary is empty: build it from a non-empty text")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("tokenizer vocabulary entries must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens))  # ids after the characters
        if any(len(t) < 2 for t in self.special_tokens):
            raise ValueError("a special token must be at least two characters (one character is a plain token)")
        self.special_ids = {t: len(self.chars) + i for i, t in enumerate(self.special_tokens)}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True)))
                                 + ")") if self.special_tokens else None
        self.chat = None  # a gpt.chat.ChatTemplate, when the model has one

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def unknown(self, text: str) -> list[tuple[int, str]]:
        """(position, character) for each character of `text` outside the vocabulary."""
        return [(i, c) for i, c in enumerate(text) if c not in self.stoi]

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0] if self._split else self._encode_chars(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """The ids, and the character offset in `text` where each one starts."""
        if not self._split:
            return self._encode_chars(text), list(range(len(text)))
        ids, starts, at = [], [], 0
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # a special token
                ids.append(self.special_ids[piece])
                starts.append(at)
            elif piece:
                ids += self._encode_chars(piece)
                starts += range(at, at + len(piece))
            at += len(piece)
        return ids, starts

    def _encode_chars(self, text: str) -> list[int]:
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
        pieces = self.chars + self.special_tokens
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} out of range [0, {self.vocab_size})")
        return "".join(pieces[i] for i in ids)

    def token_bytes(self) -> list[bytes]:
        return [c.encode("utf-8") for c in self.chars + self.special_tokens]

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes())

    def token_id(self, token: str) -> int | None:
        return self.special_ids.get(token, self.stoi.get(token))

    def with_special_tokens(self, tokens: Sequence[str]) -> CharTokenizer:
        """This vocabulary, plus each of `tokens` it lacks as a new id at the end."""
        out = CharTokenizer(self.chars, self.special_tokens + [t for t in tokens if self.token_id(t) is None])
        out.chat = self.chat
        return out

    def to_dict(self) -> dict:
        if self.special_tokens:  # version 2: an earlier build would misread the ids, so it refuses the file
            return {"type": "char", "version": 2, "chars": self.chars, "special_tokens": self.special_tokens}
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        if data.get("type") != "char" or data.get("version") not in (FORMAT_VERSION, 2):
            raise ValueError(
                f"tokenizer is type={data.get('type')!r} version={data.get('version')!r}; this build reads "
                f"type='char' version 1 or 2: re-export with this version of gpt"
            )
        return cls(data["chars"], data.get("special_tokens") or ())

    def save(self, path: str | Path) -> None:
        save_tokenizer(self, path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.to_dict() == other.to_dict()


class BPETokenizer:
    """Byte-level BPE (Hugging Face `tokenizers`): any UTF-8 text encodes, nothing is out of vocabulary."""

    kind = "bpe"

    def __init__(self, tokenizer):  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(EOT)
        self._bytes: list[bytes] | None = None
        self.chat = None  # a gpt.chat.ChatTemplate, when the model has one

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size` tokens (256 bytes, EOT, merges) from an iterator of texts."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # the library raises its own exception types
            raise ValueError(f"not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """The ids, and the character offset in `text` where each one starts."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> BPETokenizer:
        """This vocabulary, plus each of `tokens` it lacks as a new special id at the end."""
        from tokenizers import AddedToken, Tokenizer

        copy = Tokenizer.from_str(self.to_json())
        copy.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens
                                 if self.token_id(t) is None])
        out = BPETokenizer(copy)
        out.chat = self.chat
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on all cores."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} out of range [0, {self.vocab_size})")
        return b"".join(self.token_bytes()[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """The bytes of each id: byte-level BPE writes bytes as printable characters; map them back."""
        if self._bytes is None:
            to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            out = []
            for i in range(self.vocab_size):
                piece = self.tokenizer.id_to_token(i) or ""
                if i == self.eot_id or any(c not in to_byte for c in piece):  # a special token: its text
                    out.append(b"" if i == self.eot_id else piece.encode("utf-8"))
                else:
                    out.append(bytes(to_byte[c] for c in piece))
            self._bytes = out
        return self._bytes

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes())

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        save_tokenizer(self, path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json()


Tokenizer = CharTokenizer | BPETokenizer


def char_as_byte_level(tokenizer: CharTokenizer) -> list[str]:
    """A character vocabulary as a byte-level BPE vocabulary (what llama.cpp and transformers read):
    each character as the byte-level string of its UTF-8 byte, ids unchanged, and no merges, so each
    character is its own token. A character of several UTF-8 bytes would need merges to become one
    token, so such a vocabulary raises ValueError."""
    wide = [c for c in tokenizer.chars if len(c.encode("utf-8")) > 1]
    if wide:
        raise ValueError(f"the character vocabulary holds {len(wide)} character(s) of several UTF-8 bytes "
                         f"({''.join(wide[:5])!r}), which a byte-level tokenizer cannot produce as one token; "
                         "export it as ONNX, or train with data.tokenizer=bpe")
    to_unicode = _bytes_to_unicode()
    return [to_unicode[c.encode("utf-8")[0]] for c in tokenizer.chars]


def byte_level_twin(tokenizer: CharTokenizer) -> BPETokenizer:
    """The character vocabulary as a Hugging Face byte-level BPE tokenizer giving the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = char_as_byte_level(tokenizer)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    twin = BPETokenizer(tok).with_special_tokens(tokenizer.special_tokens)  # the same ids after the characters
    twin.chat = tokenizer.chat
    return twin


def tokenizer_from_json(text: str) -> Tokenizer:
    """Either kind, from the text of its tokenizer.json."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"tokenizer.json is not valid JSON ({e})") from None
    if isinstance(data, dict) and data.get("type") == "char":
        return CharTokenizer.from_dict(data)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return BPETokenizer.from_json(text)
    raise ValueError("tokenizer.json is neither a char vocabulary nor a Hugging Face tokenizers file")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """tokenizer.json, with the chat template of the tokenizer_config.json beside it (if any)."""
    from gpt.chat import read_chat_template

    tokenizer = tokenizer_from_json(Path(path).read_text(encoding="utf-8"))
    tokenizer.chat = read_chat_template(Path(path).parent)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """tokenizer.json, and the chat template (if any) in tokenizer_config.json beside it."""
    from gpt.chat import write_chat_fields

    Path(path).write_text(tokenizer.to_json(), encoding="utf-8")
    if tokenizer.chat is not None:
        write_chat_fields(Path(path).parent, tokenizer.chat)


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids that end a generation: the end of a document, and the end of an assistant turn."""
    out = {tokenizer.eot_id} if tokenizer.eot_id is not None else set()
    if tokenizer.chat is not None and tokenizer.token_id(tokenizer.chat.eos_token) is not None:
        out.add(tokenizer.token_id(tokenizer.chat.eos_token))
    return out


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A fingerprint of what each id means."""
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


class StreamDecoder:
    """Ids in, text out, one token at a time; holds back the bytes of a character not yet complete."""

    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self.token_bytes[token])

    def flush(self) -> str:
        """What is still held back, at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)

    def decode_all(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield self.feed(i)
        yield self.flush()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as a printable character, the alphabet byte-level BPE works in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
