"""The file formats a corpus comes in, each read as documents without holding a whole file in memory.

    .txt, .md                        one document per file, read a chunk at a time (gpt.corpus)
    .jsonl, .jsonl.gz, .jsonl.zst    one document per line: its `data.text_field` string (streamed)
    .parquet                         one document per row of the `data.text_field` column, read a record
                                     batch of one row group at a time (pyarrow)
    .arrow                           the same, from the Arrow files `datasets`' save_to_disk writes

A document's name is the file relative to the corpus root, with ":LINE" (JSON lines) or ":ROW"
(parquet and Arrow rows) after it: the validation split hashes it. A file that cannot be read (not
UTF-8, truncated, corrupt) is a CorpusError naming it and where; with data.skip_bad_files it is left
out whole, and counted.

pyarrow and zstandard come with the `corpora` extra; gzip is Python's own.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

COMPRESSED_JSONL = (".jsonl.gz", ".jsonl.zst")
TABLES = (".parquet", ".arrow")
BATCH_ROWS = 1024  # rows of a parquet or Arrow file decoded at a time


class FormatError(ValueError):
    """A file that cannot be read as its format says; the message names the file and the place."""


def kind(path: Path) -> str:
    """text, jsonl or table, by the file's name."""
    name = path.name
    if name.endswith((".jsonl", *COMPRESSED_JSONL)):
        return "jsonl"
    if name.endswith(TABLES):
        return "table"
    return "text"


def is_corpus_file(path: Path) -> bool:
    return path.name.endswith((".txt", ".md", ".jsonl", *COMPRESSED_JSONL, *TABLES))


# --- JSON lines, plain or compressed -----------------------------------------------------------------

def lines(path: Path) -> Iterator[bytes]:
    """The lines of a .jsonl, .jsonl.gz or .jsonl.zst file, decompressed as they are read. A compressed
    stream that ends early raises EOFError (gzip does so itself; zstd's reader would just stop)."""
    if path.name.endswith(".zst"):
        yield from _zstd_lines(path)
        return
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        yield from f


def _zstd_lines(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        raise FormatError(f"{path} is zstd-compressed: pip install zstandard (the corpora extra: "
                          'pip install -e ".[corpora]")') from None
    pending, frame = b"", None  # frame: the decompressor of a frame begun and not yet ended
    with open(path, "rb") as f:
        while data := f.read(block):
            out = []
            while data:
                frame = frame or zstandard.ZstdDecompressor().decompressobj()
                out.append(frame.decompress(data))
                data = b""
                if frame.eof:  # the frame ended inside this block: the rest starts the next one
                    data, frame = frame.unused_data, None
            *complete, pending = (pending + b"".join(out)).split(b"\n")
            for line in complete:
                yield line + b"\n"
    if frame is not None:
        raise EOFError("the zstd stream ends inside a frame: the file is cut short")
    if pending:
        yield pending


def json_lines(path: Path, text_field: str) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None, problem) of every non-blank line; a problem names what is wrong with a
    line that has no text string. A damaged compressed stream raises FormatError."""
    for number, record, problem in json_records(path):
        text = record.get(text_field) if isinstance(record, dict) else None
        if problem or isinstance(text, str):
            yield number, None if problem else text, problem
        else:
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            yield number, None, f"has no {text_field!r} string (its fields: {fields}); set data.text_field"


def json_records(path: Path) -> Iterator[tuple[int, object, str]]:
    """(line number, the parsed JSON or None, problem) of every non-blank line; the problem names a line
    that is not JSON. A damaged compressed stream raises FormatError."""
    number = 0
    try:
        for number, raw in enumerate(lines(path), 1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw), ""
            except ValueError as e:
                yield number, None, f"is not a JSON object ({e})"
    except (OSError, EOFError) as e:  # gzip: BadGzipFile (an OSError) or EOFError when truncated
        raise FormatError(f"{path} is damaged after line {number} ({type(e).__name__}: {e})") from None
    except Exception as e:  # zstandard.ZstdError derives from Exception alone
        if type(e).__name__ != "ZstdError":
            raise
        raise FormatError(f"{path} is damaged after line {number} ({e})") from None


# --- parquet and Arrow tables ------------------------------------------------------------------------

def table_rows(path: Path, text_field: str) -> Iterator[tuple[int, str | None]]:
    """(row, text or None) of every row of a .parquet or .arrow file, a batch at a time."""
    for row, text in table_values(path, text_field):
        yield row, text if isinstance(text, str) else None


def table_values(path: Path, column: str) -> Iterator[tuple[int, object]]:
    """(row, value) of one column of a .parquet or .arrow file, as Python values, a batch at a time."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise FormatError(f"{path} needs pyarrow: pip install pyarrow (the corpora extra: "
                          'pip install -e ".[corpora]")') from None
    batches = _parquet_batches(path, column) if path.name.endswith(".parquet") else _arrow_batches(path, column)
    row = 0
    for values in batches:
        for value in values.to_pylist():
            yield row, value
            row += 1


def _parquet_batches(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    _require_column(path, f.schema_arrow.names, text_field)
    for group in range(f.num_row_groups):
        try:
            for batch in f.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[text_field]):
                yield batch.column(0)
        except (pa.ArrowException, OSError) as e:
            raise FormatError(f"{path}: row group {group} of {f.num_row_groups} cannot be read "
                              f"({str(e).splitlines()[0]})") from None


def _arrow_batches(path: Path, text_field: str):
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:  # the streaming format, which datasets' save_to_disk writes; else the file format
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            _require_column(path, reader.schema.names, text_field)
            for batch in batches:
                yield batch.column(text_field)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path} is not a readable Arrow file ({str(e).splitlines()[0]})") from None


def _require_column(path: Path, names: list[str], text_field: str) -> None:
    if text_field not in names:
        raise FormatError(f"{path} has no column {text_field!r} (its columns: {', '.join(names)}): set "
                          "data.text_field to the one that holds the text")


def unreadable(path: Path, text_field: str) -> str:
    """Why a JSON-lines or table file cannot be read to its end, or "" (a whole pass, for skip_bad_files)."""
    try:
        if kind(path) == "jsonl":
            for _ in json_lines(path, text_field):
                pass
        else:
            for _ in table_rows(path, text_field):
                pass
    except FormatError as e:
        return str(e)
    return ""
