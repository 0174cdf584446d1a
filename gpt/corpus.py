"""A corpus of many files, read as documents, split into train and val, written as token shards.

    files      data.path: a file, a folder (recursively), a glob, or hf:NAME[:SPLIT] (a Hugging Face dataset)
    documents  a .txt or .md file is one document; each line of a .jsonl(.gz/.zst) file, or row of a
               .parquet or .arrow file, is one: its data.text_field (gpt/formats.py reads each format)
    split      with two or more documents, a document goes to val when a hash of its name falls under
               val_fraction: whole documents, the same ones on every machine and every run. A corpus
               of one document (the tutorial's single file) keeps the tutorial's split: its tail.
               plan_split() makes the plan in a first pass, split_text() follows it in the second.
    shards     the token stream of each split in files of at most SHARD_TOKENS tokens (uint16 when
               the vocabulary fits, else uint32), read back memory-mapped as one `ShardedTokens`

Nothing here holds a whole document in memory: text is read in chunks, and a chunk of byte-level
BPE input ends only where the pre-tokenizer would cut anyway (a single newline between two
non-space characters), so chunked encoding gives the tokens of the whole document.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.formats import FormatError, is_corpus_file, json_lines, kind, table_rows, unreadable

SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB as uint16
CHUNK_BYTES = 1 << 20  # text is read and handed to the tokenizer about 1 MB at a time


class CorpusError(RuntimeError):
    """A corpus that cannot be read. The message names the file and what to do."""


def find_files(spec: str) -> tuple[list[Path], Path]:
    """The corpus files `data.path` names, sorted, and the folder their names are taken relative to."""
    if spec.startswith("hf:"):
        return hub_files(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_corpus_file(p))
        if not files:
            raise CorpusError(f"data.path={spec} holds no .txt, .md, .jsonl(.gz/.zst), .parquet or .arrow files: "
                              "point it at a folder with text")
        return files, path
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"data.path={spec} matches no files: check the pattern")
        return files, Path(os.path.commonpath([str(p.parent) for p in files]))
    raise CorpusError(f"data.path={spec} does not exist: point it at a text file, a folder of them, or a glob")


def hub_files(spec: str) -> tuple[list[Path], Path]:
    """data.path=hf:NAME[:SPLIT]: the dataset's files from the Hugging Face Hub (cached by huggingface_hub,
    so later runs, and HF_HUB_OFFLINE=1, read the cache), those of SPLIT only when one is named."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CorpusError(f"data.path={spec} needs huggingface_hub: pip install huggingface_hub") from None
    try:
        root = Path(snapshot_download(repo_id=name, repo_type="dataset"))
    except Exception as e:  # offline without a cached copy, an unknown name, no access
        raise CorpusError(f"data.path={spec}: the Hub has no dataset {name!r} this machine can get "
                          f"({type(e).__name__}); check the name, or download it and point data.path at it") from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_corpus_file(p))
    if split:
        files = [p for p in files if split in p.relative_to(root).parts[:-1] or p.name.startswith(f"{split}-")
                 or p.name.startswith(f"{split}.")]
    if not files:
        raise CorpusError(f"data.path={spec}: {root} holds no corpus files{f' for split {split!r}' if split else ''}")
    return files, root


@dataclass
class Document:
    name: str  # the file relative to the corpus root, with ":LINE" for a .jsonl line
    text_chunks: Iterator[str]  # the document's text, a chunk at a time


@dataclass
class Skipped:
    empty: list[str] = field(default_factory=list)
    not_utf8: list[str] = field(default_factory=list)
    no_text: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # truncated or corrupt compressed files and tables

    def summary(self) -> str:
        parts = [f"{len(v)} {k.replace('_', ' ')}" for k, v in vars(self).items() if v]
        return ", ".join(parts) if parts else "none"


def _read_chunks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text in chunks; a bad byte is an error naming the file and the byte's offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path} is not UTF-8 ({e.reason} at byte {offset + e.start}): convert it to UTF-8, or set "
                    "data.skip_bad_files=true to leave such files out (they are counted)"
                ) from None
            offset += len(block)
            if text:
                yield text
        try:
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CorpusError(f"{path} is not UTF-8 (it ends inside a character, at byte {offset}): convert it "
                              "to UTF-8, or set data.skip_bad_files=true to leave such files out") from None
        if tail:
            yield tail


def _utf8_ok(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                decoder.decode(block)
        decoder.decode(b"", final=True)
        return True
    except UnicodeDecodeError:
        return False


def documents(files: list[Path], root: Path, skip_bad: bool, skipped: Skipped | None = None,
              text_field: str = "text") -> Iterator[Document]:
    """Every document of the corpus, in a fixed order. Fills `skipped` with what was left out."""
    skipped = skipped if skipped is not None else Skipped()
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if path.stat().st_size == 0:
            skipped.empty.append(name)
            continue
        if kind(path) == "text":
            if skip_bad and not _utf8_ok(path):
                skipped.not_utf8.append(name)
                continue
            yield Document(name, _read_chunks(path))
            continue
        problem = unreadable(path, text_field) if skip_bad else ""
        if problem:
            skipped.unreadable.append(name)
            continue
        try:
            yield from _records(path, name, skip_bad, skipped, text_field)
        except FormatError as e:
            raise CorpusError(f"{e}; or set data.skip_bad_files=true to leave such files out (they are counted)") \
                from None


def _records(path: Path, name: str, skip_bad: bool, skipped: Skipped, text_field: str) -> Iterator[Document]:
    """The documents of a JSON-lines file (one a line) or a table (one a row)."""
    if kind(path) == "table":
        for row, text in table_rows(path, text_field):
            if text:
                yield Document(f"{name}:{row}", iter([text]))
            else:
                (skipped.empty if text == "" else skipped.no_text).append(f"{name}:{row}")
        return
    for number, text, problem in json_lines(path, text_field):
        where = f"{name}:{number}"
        if problem:
            if skip_bad:
                skipped.no_text.append(where)
                continue
            raise CorpusError(f"{path}:{number} {problem}; or set data.skip_bad_files=true to leave such lines out")
        if not text:
            skipped.empty.append(where)
            continue
        yield Document(where, iter([text]))


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def in_val(name: str, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its name, so the choice never depends on order or machine."""
    return name_hash(name) / 2**64 < val_fraction


def safe_pieces(text: str, carry: str = "") -> tuple[list[str], str]:
    """Cut `carry + text` where byte-level BPE's pre-tokenizer cuts anyway (after a newline that has a
    non-space character on each side); the part after the last such cut is carried to the next chunk."""
    text = carry + text
    pieces, start, i = [], 0, text.find("\n", 1)
    while i != -1:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            if i + 1 - start >= 4096 or not pieces:  # pieces of a few KB at least: fewer, larger calls
                pieces.append(text[start:i + 1])
                start = i + 1
        i = text.find("\n", i + 1)
    return pieces, text[start:]


class ShardWriter:
    """Appends tokens to SPLIT-NNNN.bin files in `folder`, starting a new file every SHARD_TOKENS."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards: list[list] = []  # [file name, tokens]
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1][1] >= SHARD_TOKENS:
                self._open()
            room = SHARD_TOKENS - self.shards[-1][1]
            part, tokens = tokens[:room], tokens[room:]
            np.asarray(part, dtype=self.dtype).tofile(self._file)
            self.shards[-1][1] += len(part)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append([name, 0])

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)


class ShardedTokens:
    """Several memory-mapped shards read as one array: len() and slices, nothing loaded up front."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not isinstance(index, slice):
            i = int(index) + (len(self) if int(index) < 0 else 0)
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.arrays[k][i - self.starts[k]]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens slices take no step")
        parts, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop and k < len(self.arrays):
            lo, hi = start - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            parts.append(self.arrays[k][lo:hi])
            start = int(self.starts[k + 1])
            k += 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


@dataclass
class SplitPlan:
    """What the first pass over a corpus found, and which documents go to which split."""

    documents: int
    chars: int
    chars_set: set[str]  # every character seen (collected for a char tokenizer only)
    skipped: Skipped
    val_fraction: float
    split_at: int | None = None  # a corpus of one document: where its train part ends, in characters
    force_val: str | None = None  # every split needs a document: the one moved to val ...
    force_train: str | None = None  # ... or to train, when the hash put none there

    def split_of(self, name: str) -> str:
        if name == self.force_val:
            return "val"
        if name == self.force_train:
            return "train"
        return "val" if in_val(name, self.val_fraction) else "train"


def plan_split(files: list[Path], root: Path, val_fraction: float, skip_bad: bool, collect_chars: bool,
               text_field: str = "text") -> SplitPlan:
    """The first pass: count documents and characters, collect the character set, plan the split."""
    skipped = Skipped()
    chars: set[str] = set()
    n_docs = n_chars = n_val = 0
    lowest = highest = None  # (hash, name) of the documents first and last in hash order
    for doc in documents(files, root, skip_bad, skipped, text_field):
        n_docs += 1
        for chunk in doc.text_chunks:
            n_chars += len(chunk)
            if collect_chars:
                chars.update(chunk)
        n_val += in_val(doc.name, val_fraction)
        key = (name_hash(doc.name), doc.name)
        lowest, highest = min(lowest or key, key), max(highest or key, key)
    if n_docs == 0:
        raise CorpusError(f"{root} has no text to train on: {len(files)} file(s), skipped {skipped.summary()}")
    plan = SplitPlan(n_docs, n_chars, chars, skipped, val_fraction)
    if n_docs == 1:  # the tutorial's split: the tail of the one text
        plan.split_at = n_chars - int(n_chars * val_fraction)
    elif n_val == 0:
        plan.force_val = lowest[1]
    elif n_val == n_docs:
        plan.force_train = highest[1]
    return plan


def split_text(files: list[Path], root: Path, skip_bad: bool, plan: SplitPlan,
               text_field: str = "text") -> Iterator[tuple[str, str | None]]:
    """(split, text chunk) for every chunk of every document, then (split, None) at each document's end."""
    for doc in documents(files, root, skip_bad, text_field=text_field):
        if plan.split_at is None:
            split = plan.split_of(doc.name)
            for chunk in doc.text_chunks:
                yield split, chunk
            yield split, None
            continue
        seen, train_ended = 0, False
        for chunk in doc.text_chunks:
            cut = min(max(plan.split_at - seen, 0), len(chunk))
            if cut:
                yield "train", chunk[:cut]
            if cut < len(chunk):
                if not train_ended and plan.split_at > 0:
                    yield "train", None  # the train part ends here (mid-chunk or at a chunk's start)
                train_ended = True
                yield "val", chunk[cut:]
            seen += len(chunk)
        yield ("val" if train_ended else "train"), None
