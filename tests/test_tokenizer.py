import pytest

from gpt.tokenizer import CharTokenizer, load_tokenizer


def test_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set(text))
    assert ids == [tok.chars.index(c) for c in text]  # sorted vocabulary


def test_unknown_characters_are_named_with_positions():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError) as e:
        tok.encode("ab é z")
    message = str(e.value)
    assert "'é' at position 3" in message and "'z' at position 5" in message
    assert "2 character(s)" in message


def test_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("hello, world\n")
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json") == tok


def test_version_mismatch_says_what_to_do():
    with pytest.raises(ValueError, match="version"):
        CharTokenizer.from_dict({"type": "char", "version": 99, "chars": ["a"]})


def test_decode_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer.from_text("ab").decode([0, 5])
