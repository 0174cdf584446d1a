"""Corpora in the formats they come in: parquet, compressed JSON lines, datasets' save_to_disk folders,
and a Hugging Face dataset by name, read from a local folder in the Hub's cache layout."""

import gzip
import json
from pathlib import Path

import pytest

from conftest import REQUIRE_ALL, require, shakespeare
from gpt.config import DataConfig
from gpt.corpus import documents, find_files
from gpt.data import DataError, prepare

pa = require("pyarrow", "pip install -e '.[corpora]'")
pq = require("pyarrow.parquet", "pip install -e '.[corpora]'")
zstandard = require("zstandard", "pip install -e '.[corpora]'")

TEXT = shakespeare()
DOCS = [p for p in TEXT[:40_000].split("\n\n") if p] + ["naïve café — 東京 ✓"]


def write_all_formats(folder: Path, docs: list[str], field: str = "text") -> dict[str, Path]:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst, .parquet (several row groups) and, where the
    datasets package is installed (the eval extra brings it), a save_to_disk folder; each in a folder of
    its own."""
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    out = {}
    for name, data in (("jsonl", lines), ("jsonl.gz", gzip.compress(lines)),
                       ("jsonl.zst", zstandard.ZstdCompressor().compress(lines))):
        (folder / name).mkdir(parents=True)
        (folder / name / f"docs.{name}").write_bytes(data)
        out[name] = folder / name
    (folder / "parquet").mkdir()
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), folder / "parquet" / "docs.parquet",
                   row_group_size=7)
    out["parquet"] = folder / "parquet"
    try:
        import datasets
    except ImportError:
        if REQUIRE_ALL:
            raise
        return out  # the other formats are still tested
    datasets.Dataset.from_dict({field: docs}).save_to_disk(str(folder / "arrow"))
    out["arrow"] = folder / "arrow"
    return out


def test_the_same_documents_give_the_same_tokens_whichever_format_held_them(tmp_path):
    folders = write_all_formats(tmp_path, DOCS)
    tokenizer_file = tmp_path / "tokenizer.json"
    reference = prepare(DataConfig(path=str(folders["jsonl"]), tokenizer="bpe", vocab_size=400), progress=False)
    reference.tokenizer.save(tokenizer_file)
    for kind, folder in folders.items():
        files, root = find_files(str(folder))
        texts = ["".join(d.text_chunks) for d in documents(files, root, skip_bad=False)]
        assert texts == DOCS, kind  # document by document, in order
        corpus = prepare(DataConfig(path=str(folder), tokenizer="bpe", tokenizer_file=str(tokenizer_file)),
                         progress=False)
        tokens = sum(s["tokens"] for s in corpus.stats["splits"].values())
        assert tokens == sum(len(reference.tokenizer.encode(d)) + 1 for d in DOCS), kind  # + EOT each
        assert sum(s["documents"] for s in corpus.stats["splits"].values()) == len(DOCS)
        assert corpus.stats["splits"]["val"]["documents"] >= 1  # whole documents held out by name


def test_text_field_names_the_column_and_a_missing_one_is_one_line(tmp_path):
    folders = write_all_formats(tmp_path, DOCS[:20], field="content")
    corpus = prepare(DataConfig(path=str(folders["parquet"]), text_field="content"), progress=False)
    assert sum(s["documents"] for s in corpus.stats["splits"].values()) == 20
    for kind in ("parquet", "jsonl.zst", "arrow"):
        with pytest.raises(DataError, match=r"no (column|.*string).*'text'|'text'.*content") as e:
            prepare(DataConfig(path=str(folders[kind])), progress=False)
        assert "\n" not in str(e.value) and "content" in str(e.value) and "text_field" in str(e.value)


def test_damaged_files_are_named_skipped_on_request_and_leave_nothing_in_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT_CACHE_DIR", str(cache))
    folders = write_all_formats(tmp_path / "formats", DOCS[:30])
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[30:60]))
    for kind, name, cut in (("jsonl.gz", "docs.jsonl.gz", 0.6), ("jsonl.zst", "docs.jsonl.zst", 0.6),
                            ("parquet", "docs.parquet", 0.5)):
        folder = tmp_path / f"bad-{kind}"
        folder.mkdir()
        data = (folders[kind] / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * cut)])  # a download cut short
        (folder / "good.jsonl").write_bytes(good.read_bytes())
        tokens = cache / "tokens"
        before = sorted(tokens.iterdir()) if tokens.exists() else []
        with pytest.raises(DataError, match=rf"{name}.*(damaged|not a readable).*skip_bad_files") as e:
            prepare(DataConfig(path=str(folder)), progress=False)
        assert "\n" not in str(e.value)
        assert (sorted(tokens.iterdir()) if tokens.exists() else []) == before  # nothing half-prepared
        corpus = prepare(DataConfig(path=str(folder), skip_bad_files=True), progress=False)
        assert corpus.stats["skipped"]["unreadable"] == 1
        assert sum(s["documents"] for s in corpus.stats["splits"].values()) == 30  # the good file, whole


def test_a_hub_dataset_by_name_from_the_local_cache(tmp_path, monkeypatch):
    """data.path=hf:NAME:SPLIT through huggingface_hub's cache, offline: a folder in the Hub's layout."""
    require("huggingface_hub", "pip install -e '.[hf]'")
    repo = tmp_path / "hub" / "datasets--someone--plays"
    snapshot = repo / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pq.write_table(pa.table({"text": DOCS[:25]}), snapshot / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": DOCS[25:30]}), snapshot / "data" / "test-00000-of-00001.parquet")
    import huggingface_hub.constants as hub  # read when the package is imported: set them there too

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    files, root = find_files("hf:someone/plays:train")
    assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
    corpus = prepare(DataConfig(path="hf:someone/plays:train"), progress=False)
    assert sum(s["documents"] for s in corpus.stats["splits"].values()) == 25
    assert len(find_files("hf:someone/plays")[0]) == 2
    with pytest.raises(DataError, match="hf:nobody/nothing.*no dataset"):
        prepare(DataConfig(path="hf:nobody/nothing"), progress=False)
