import hashlib
import http.server
import threading

import numpy as np
import pytest

from gpt.config import DataConfig
from gpt.data import DataError, get_batch, prepare
from gpt.datasets import download, resolve_corpus

BODY = ("To be, or not to be, that is the question:\n" * 50).encode()
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    """A local HTTP server; `plan` is the list of responses it gives, one per request."""
    state = {"plan": [], "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"] += 1
            status, body = state["plan"].pop(0) if state["plan"] else (200, BODY)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_port}/input.txt"
    yield state
    httpd.shutdown()


def test_download_good_file(server, tmp_path):
    dest = tmp_path / "d" / "input.txt"
    assert download(server["url"], dest, SHA) == dest
    assert dest.read_bytes() == BODY
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]  # no temporary file left


def test_download_bad_checksum(server, tmp_path):
    server["plan"] = [(200, b"tampered")]
    dest = tmp_path / "input.txt"
    with pytest.raises(DataError, match="sha256"):
        download(server["url"], dest, SHA)
    assert not dest.exists()


def test_download_retries_after_server_error(server, tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.datasets.time.sleep", lambda s: None)
    server["plan"] = [(500, b"oops"), (503, b"busy")]
    download(server["url"], tmp_path / "input.txt", SHA)
    assert server["requests"] == 3


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.datasets.time.sleep", lambda s: None)
    with pytest.raises(DataError) as e:
        download("http://127.0.0.1:9/input.txt", tmp_path / "input.txt", SHA, retries=2, timeout=2)
    assert str(tmp_path / "input.txt") in str(e.value) and "GPT_DATA_DIR" in str(e.value)


def test_tinyshakespeare_is_downloaded_into_the_cache_when_missing(server, tmp_path, monkeypatch):
    monkeypatch.delenv("GPT_DATA_DIR", raising=False)
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    from gpt.datasets import DATASETS, Dataset

    monkeypatch.setitem(DATASETS, "tinyshakespeare", Dataset(url="unused", sha256=SHA))
    path = resolve_corpus(DataConfig(), url=server["url"])
    assert path == tmp_path / "datasets" / "tinyshakespeare" / "input.txt" and path.read_bytes() == BODY
    assert resolve_corpus(DataConfig(), url="http://127.0.0.1:9/unused") == path  # cached: no second download
    assert server["requests"] == 1


def test_tinyshakespeare_is_verified():
    path = resolve_corpus(DataConfig())
    assert path.stat().st_size == 1_115_394


def test_prepare_tokenizes_to_a_memory_mapped_cache(tmp_path):
    text = "hello world, hello tokens\n" * 40
    (tmp_path / "t.txt").write_text(text)
    corpus = prepare(DataConfig(path=str(tmp_path / "t.txt"), val_fraction=0.25))
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert len(corpus.val) == int(len(text) * 0.25)
    assert corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist()) == text
    again = prepare(DataConfig(path=str(tmp_path / "t.txt"), val_fraction=0.25))  # from the cache
    assert np.array_equal(again.train, corpus.train)


def test_missing_path_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(path=str(tmp_path / "nope.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(DataConfig(path=str(tmp_path / "latin1.txt")))


def test_batches_depend_only_on_seed_split_step_shard():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 8, 1, "train", 5, 0)
    assert x.shape == y.shape == (4, 8)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    x2, _ = get_batch(data, 4, 8, 1, "train", 5, 0)
    assert (x == x2).all()
    assert not (x == get_batch(data, 4, 8, 1, "train", 6, 0)[0]).all()
    assert not (x == get_batch(data, 4, 8, 1, "train", 5, 1)[0]).all()
    assert not (x == get_batch(data, 4, 8, 1, "train", 5, 0, evaluation=True)[0]).all()


def test_split_shorter_than_a_window():
    with pytest.raises(DataError, match="block_size"):
        get_batch(np.arange(8, dtype=np.uint16), 2, 8, 0, "val", 0, 0)
