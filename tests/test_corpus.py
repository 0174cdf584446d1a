"""Your own corpus: byte-level BPE, many files as whole documents, shards, and what bad input gets."""

import json
import subprocess
import sys

import numpy as np
import pytest

import gpt.corpus
from conftest import ROOT, shakespeare, subprocess_env
from gpt.config import ConfigError, DataConfig, load_run_config
from gpt.corpus import ShardedTokens, safe_pieces
from gpt.data import DataError, bits_per_byte, prepare
from gpt.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def text():
    return shakespeare()


@pytest.fixture(scope="module")
def bpe(text):
    return BPETokenizer.train([text[:300_000]], 512)


def test_bpe_round_trips_any_utf8_and_streams_whole_characters(bpe):
    s = "ROMEO: café, naïve — 日本語 🎉\n\tend"
    ids = bpe.encode(s)
    assert bpe.decode(ids) == s and bpe.eot_id == 0 and bpe.vocab_size == 512
    pieces = list(bpe.stream().decode_all(ids))
    assert "".join(pieces) == s
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    split = [i for i in ids if len(bpe.token_bytes()[i]) == 1 and bpe.token_bytes()[i][0] >= 0x80]
    assert split, "the emoji and CJK text should need byte tokens that end inside a character"
    decoder = bpe.stream()
    emoji = bpe.encode("🎉")
    assert len(emoji) > 1 and [decoder.feed(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert decoder.feed(emoji[-1]) == "🎉"


def test_char_and_bpe_tokenizers_share_one_interface(tmp_path, bpe):
    char = CharTokenizer.from_text("abc\n")
    for tok in (char, bpe):
        tok.save(tmp_path / f"{tok.kind}.json")
        again = load_tokenizer(tmp_path / f"{tok.kind}.json")
        assert again == tok and again.kind == tok.kind and again.encode("abc\n") == tok.encode("abc\n")
        assert "".join(tok.stream().decode_all(tok.encode("abc\n"))) == "abc\n"
    with pytest.raises(ValueError, match="neither"):
        (tmp_path / "x.json").write_text('{"hello": 1}')
        load_tokenizer(tmp_path / "x.json")


def test_chunked_encoding_equals_encoding_the_whole_document(text, bpe):
    whole = bpe.encode(text[:200_000])
    pieces, carry, out = [], "", []
    for i in range(0, 200_000, 7_919):  # chunks that cut anywhere, words and lines included
        ps, carry = safe_pieces(text[i:min(i + 7_919, 200_000)], carry)
        pieces += ps
    pieces.append(carry)
    for p in pieces:
        out += bpe.encode(p)
    assert "".join(pieces) == text[:200_000] and len(pieces) > 10
    assert out == whole


def make_corpus(root, text, n=24):
    """Nested .txt, .md and .jsonl files, an empty file and a file that is not text."""
    speeches = text.split("\n\n")
    (root / "plays" / "acts").mkdir(parents=True)
    for i in range(n):
        (root / "plays" / f"scene{i:02d}.txt").write_text("\n\n".join(speeches[i * 40:(i + 1) * 40]))
    (root / "plays" / "acts" / "notes.md").write_text("# Notes\nnaïve café 日本語\n")
    (root / "plays" / "acts" / "empty.txt").write_text("")
    (root / "plays" / "image.png").write_bytes(b"\x89PNG\r\n")
    with open(root / "plays" / "acts" / "lines.jsonl", "w") as f:
        for j in range(10):
            f.write(json.dumps({"text": speeches[2000 + j], "id": j}) + "\n")
    return root / "plays"


def test_a_folder_of_files_is_read_as_whole_documents_split_by_hash(tmp_path, text):
    folder = make_corpus(tmp_path, text)
    corpus = prepare(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=400, val_fraction=0.2), progress=False)
    stats = corpus.stats
    assert stats["files"] == 27  # the .png is not read
    assert stats["skipped"]["empty"] == 1
    docs = stats["splits"]["train"]["documents"] + stats["splits"]["val"]["documents"]
    assert docs == 24 + 1 + 10
    assert 2 <= stats["splits"]["val"]["documents"] <= 14
    eot = corpus.tokenizer.eot_id
    for split in ("train", "val"):  # every document whole, each followed by <|endoftext|>
        tokens = np.asarray(corpus.split(split)[:])
        assert tokens[-1] == eot and (tokens == eot).sum() == stats["splits"][split]["documents"]
    def split_documents(tokens):
        cuts = np.flatnonzero(tokens == eot)
        return {corpus.tokenizer.decode(d.tolist()) for d in np.split(tokens, cuts + 1) if len(d) > 1}

    val_docs, train_docs = split_documents(np.asarray(corpus.val[:])), split_documents(np.asarray(corpus.train[:]))
    originals = {(folder / f"scene{i:02d}.txt").read_text() for i in range(24)}
    originals |= {json.loads(line)["text"] for line in (folder / "acts" / "lines.jsonl").read_text().splitlines()}
    originals.add((folder / "acts" / "notes.md").read_text())
    assert val_docs | train_docs == originals and not val_docs & train_docs  # whole documents, each once
    again = prepare(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=400, val_fraction=0.2), progress=False)
    assert again.sha256 == corpus.sha256 and np.array_equal(again.val[:], corpus.val[:])  # cached and stable
    globbed = prepare(DataConfig(path=str(folder / "*.txt"), val_fraction=0.2), progress=False)
    assert globbed.stats["files"] == 24 and globbed.tokenizer.kind == "char"


def test_a_changed_file_or_tokenizer_prepares_again(tmp_path, text):
    folder = make_corpus(tmp_path, text, n=4)
    first = prepare(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=400), progress=False)
    assert prepare(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=420), progress=False).sha256 != first.sha256
    (folder / "scene00.txt").write_text("changed\n" * 100)
    assert prepare(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=400), progress=False).sha256 != first.sha256


def test_shards_read_as_one_array(tmp_path, text, monkeypatch):
    monkeypatch.setattr(gpt.corpus, "SHARD_TOKENS", 10_000)
    path = tmp_path / "t.txt"
    path.write_text(text[:60_000])
    corpus = prepare(DataConfig(path=str(path)), progress=False)
    assert isinstance(corpus.train, ShardedTokens) and len(corpus.stats["splits"]["train"]["shards"]) == 6
    assert corpus.tokenizer.decode(corpus.train[9_990:10_020].tolist()) == text[9_990:10_020]  # across a seam
    assert corpus.tokenizer.decode(corpus.train[:].tolist()) == text[:54_000]


def test_a_tokenizer_file_is_used_as_it_is(tmp_path, text, bpe):
    bpe.save(tmp_path / "tokenizer.json")
    (tmp_path / "t.txt").write_text(text[:50_000])
    corpus = prepare(DataConfig(path=str(tmp_path / "t.txt"), tokenizer="bpe",
                                tokenizer_file=str(tmp_path / "tokenizer.json")), progress=False)
    assert corpus.tokenizer == bpe and corpus.stats["vocab_size"] == 512


def test_bits_per_byte_compares_tokenizers():
    assert bits_per_byte(2.0, 1.0) == pytest.approx(2.0 / np.log(2))
    assert bits_per_byte(4.0, 2.0) == pytest.approx(bits_per_byte(2.0, 1.0))
    assert bits_per_byte(2.0, None) is None


BAD = [
    ("not utf-8", lambda d: (d / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1")), {},
     r"a.txt is not UTF-8 \(invalid continuation byte at byte 3\).*data.skip_bad_files=true"),
    ("no text", lambda d: (d / "a.png").write_bytes(b"\x89PNG"), {}, "holds no .txt, .md, .jsonl"),
    ("all empty", lambda d: (d / "a.txt").write_text(""), {}, r"no text to train on: 1 file\(s\), skipped 1 empty"),
    ("jsonl without text", lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n'), {},
     r"a.jsonl:2 has no 'text' string \(its fields: body\); set data.text_field"),
    ("jsonl not json", lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\nnot json\n'), {},
     r"a.jsonl:2 is not a JSON object"),
    ("missing tokenizer file", lambda d: (d / "a.txt").write_text("hello\n"),
     {"tokenizer": "bpe", "tokenizer_file": "nope/tokenizer.json"},
     "tokenizer_file=nope/tokenizer.json does not exist"),
    ("malformed tokenizer file", lambda d: ((d / "a.txt").write_text("hello\n"), (d / "t.json").write_text("{")),
     {"tokenizer": "bpe", "tokenizer_file": "TMP/t.json"}, "not valid JSON"),
]


@pytest.mark.parametrize("name, make, settings, message", BAD, ids=[b[0] for b in BAD])
def test_bad_corpora_fail_with_one_line_naming_the_file(tmp_path, name, make, settings, message):
    folder = tmp_path / "corpus"
    folder.mkdir()
    make(folder)
    settings = {k: v.replace("TMP", str(folder)) for k, v in settings.items()}
    with pytest.raises(DataError, match=message) as e:
        prepare(DataConfig(path=str(folder), **settings), progress=False)
    assert "\n" not in str(e.value)


def test_skip_bad_files_leaves_them_out_and_counts_them(tmp_path, text):
    folder = make_corpus(tmp_path, text, n=3)
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with open(folder / "acts" / "lines.jsonl", "a") as f:
        f.write('{"body": "no text"}\n')
    corpus = prepare(DataConfig(path=str(folder), skip_bad_files=True), progress=False)
    assert corpus.stats["skipped"] == {"empty": 1, "not_utf8": 1, "no_text": 1, "unreadable": 0}


@pytest.mark.parametrize("override, message", [
    ("--data.vocab_size=100", "data.vocab_size=100 must be in [260, 1048576]"),
    ("--data.tokenizer=wordpiece", "data.tokenizer='wordpiece' must be char or bpe"),
    ("--data.tokenizer_file=x.json", "data.tokenizer_file is for data.tokenizer=bpe"),
])
def test_tokenizer_settings_are_checked_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_run_config(ROOT / "configs" / "tiny.yaml", [override])


def test_prepare_command_line(tmp_path, text):
    folder = make_corpus(tmp_path, text, n=3)
    proc = subprocess.run([sys.executable, "-m", "gpt.data", "prepare", str(ROOT / "configs" / "tiny.yaml"),
                           f"--data.path={folder}", "--data.tokenizer=bpe", "--data.vocab_size=300"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bpe tokenizer, vocabulary 300" in proc.stdout and "skipped: 1 empty" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "gpt.data", "prepare", str(ROOT / "configs" / "gpt2_small.yaml")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "data.path is required" in proc.stderr


def test_a_split_that_falls_on_a_chunk_boundary_loses_no_text(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt.corpus, "CHUNK_BYTES", 100)  # the file is read 100 bytes at a time
    words = "the quick brown fox jumps over the lazy dog\nROMEO: and all the rest\n"
    text = (words * 20)[:1000]
    (tmp_path / "t.txt").write_text(text)
    corpus = prepare(DataConfig(path=str(tmp_path / "t.txt"), tokenizer="bpe", vocab_size=300, val_fraction=0.3),
                     progress=False)  # the split is at character 700, the end of the 7th chunk
    eot = corpus.tokenizer.eot_id
    train, val = corpus.train[:].tolist(), corpus.val[:].tolist()
    assert train[-1] == eot and val[-1] == eot
    assert corpus.tokenizer.decode(train[:-1]) == text[:700] and corpus.tokenizer.decode(val[:-1]) == text[700:]


def test_every_split_gets_a_document_whatever_the_hash_says(tmp_path):
    from gpt.corpus import find_files, plan_split

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"the text of {name}\n" * 50)
    files, root = find_files(str(tmp_path))
    names = ["a.txt", "b.txt", "c.txt"]
    none_held_out = plan_split(files, root, val_fraction=1e-12, skip_bad=False, collect_chars=False)
    assert none_held_out.force_val is not None and none_held_out.force_train is None
    assert [none_held_out.split_of(n) for n in names].count("val") == 1
    all_held_out = plan_split(files, root, val_fraction=1.0, skip_bad=False, collect_chars=False)
    assert all_held_out.force_train is not None and [all_held_out.split_of(n) for n in names].count("train") == 1
    corpus = prepare(DataConfig(path=str(tmp_path), val_fraction=1e-12), progress=False)
    assert corpus.stats["splits"]["val"]["documents"] == 1 and corpus.stats["splits"]["train"]["documents"] == 2
