"""The HTTP server, as a real process on loopback, over real HTTP."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, free_port, subprocess_env
from gpt.sampling import SamplingParams
from serve.generate import generate
from serve.runtime import OnnxModel


def start_server(export_dir, *args, **env):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.server", str(export_dir), "--port", str(port),
                             "--threads", "1", *args], cwd=ROOT, env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    key = args[args.index("--api-key") + 1] if "--api-key" in args else env.get("GPT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if requests.get(f"{url}/health", headers=headers, timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become healthy in 60 s")


@pytest.fixture(scope="module")
def server(export_dir):
    proc, url = start_server(export_dir, "--max-batch", "16", "--max-queue", "64", "--max-new-tokens-limit", "100000")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def expected(export_dir):
    """What a request should produce: the runtime alone, one prompt at a time (the model the server
    takes by default: the fused graph)."""
    model = OnnxModel(export_dir, threads=1, variant="auto")

    def text(prompt, n, seed, temperature=1.0, top_p=None, top_k=None, stop=None):
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        return "".join(e.text for e in generate(model, prompt, n, params, seed, stop))
    return text


def complete(url, **body):
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


def test_health_and_models(server):
    url, _ = server
    assert requests.get(f"{url}/health").json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_completion_matches_the_command_line(server, export_dir):
    url, _ = server
    r = complete(url, model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0.8, seed=7)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"]) == 30
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}
    cli = subprocess.run([sys.executable, "-m", "serve", str(export_dir), "--prompt", "ROMEO:", "--max-new-tokens",
                          "30", "--temperature", "0.8", "--seed", "7"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True)
    assert cli.stdout == "ROMEO:" + choice["text"] + "\n"


def test_streaming_sends_pieces_then_done(server):
    url, _ = server
    whole = complete(url, prompt="JULIET:", max_tokens=25, seed=3).json()["choices"][0]["text"]
    r = requests.post(f"{url}/v1/completions", json={"prompt": "JULIET:", "max_tokens": 25, "seed": 3,
                                                     "stream": True}, stream=True, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert len(chunks) > 1 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_list_prompts_n_and_stop(server, expected):
    url, _ = server
    body = complete(url, prompt=["ROMEO:", "O"], n=2, max_tokens=20, seed=5, top_p=0.9).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == expected("ROMEO:", 20, 5, top_p=0.9)
    assert body["choices"][3]["text"] == expected("O", 20, 6, top_p=0.9)  # the n-th completion uses seed + n
    full = expected("ROMEO:", 40, 9)
    stop = full[15:17]
    choice = complete(url, prompt="ROMEO:", max_tokens=40, seed=9, stop=stop).json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_openai_client(server, expected):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    result = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, seed=2, temperature=0.7)
    assert result.choices[0].text == expected("ROMEO:", 20, 2, temperature=0.7)
    stream = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, seed=2, temperature=0.7,
                                       stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == result.choices[0].text


NAMES = ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:", "O", "MENENIUS:", "Nurse:\n"]


def concurrent_streams(url: str, count: int) -> dict[int, str]:
    results = {}

    def client(i):
        r = requests.post(f"{url}/v1/completions", json={"prompt": NAMES[i % 7], "max_tokens": 40,
                                                         "seed": i, "stream": True}, stream=True, timeout=120)
        text = ""
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
        results[i] = text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def test_32_concurrent_streams_complete_correctly(server, expected):
    url, _ = server  # the fused graph: sequences join and leave slots of one preallocated cache
    results = concurrent_streams(url, 32)
    assert sorted(results) == list(range(32))
    for i, text in results.items():
        assert text == expected(NAMES[i % 7], 40, i), i


def test_concurrent_streams_on_the_portable_graph_complete_correctly(export_dir):
    proc, url = start_server(export_dir, "--model", "fp32", "--max-batch", "8")
    try:
        results = concurrent_streams(url, 12)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    model = OnnxModel(export_dir, threads=1, variant="fp32")
    for i, text in results.items():
        params = SamplingParams(temperature=1.0)
        assert text == "".join(e.text for e in generate(model, NAMES[i % 7], 40, params, i)), i
    assert sorted(results) == list(range(12))


BAD = [
    ("not json", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("wrong type", {"json": {"prompt": "a", "max_tokens": "ten"}}, 400, "max_tokens: Input should be a valid integer"),
    ("unknown field", {"json": {"prompt": "a", "best_of_everything": 3}}, 400, "unknown field 'best_of_everything'"),
    ("missing prompt", {"json": {"max_tokens": 3}}, 400, "prompt: Field required"),
    ("out of vocabulary", {"json": {"prompt": "caf\u00e9"}}, 400, "'\u00e9' at position 3"),
    ("empty prompt", {"json": {"prompt": ""}}, 400, "prompt is empty"),
    ("max_tokens over limit", {"json": {"prompt": "a", "max_tokens": 100001}}, 400,
     "max_tokens: must be at most 100000"),
    ("max_tokens zero", {"json": {"prompt": "a", "max_tokens": 0}}, 400, "max_tokens=0 asks for no completion"),
    ("negative temperature", {"json": {"prompt": "a", "temperature": -1}}, 400,
     "temperature: Input should be greater than or equal to 0"),
    ("top_p zero", {"json": {"prompt": "a", "top_p": 0}}, 400, "top_p: Input should be greater than 0"),
    ("top_p over one", {"json": {"prompt": "a", "top_p": 1.5}}, 400, "top_p: Input should be less than or equal to 1"),
    ("n too large", {"json": {"prompt": "a", "n": 1000}}, 400, "n: must be at most "),
    ("other model", {"json": {"prompt": "a", "model": "gpt-4"}}, 404, "not served here"),
    ("oversize body", {"json": {"prompt": "a" * (2 << 20)}}, 413, "request body over 1048576 bytes"),
    ("file path as model", {"json": {"prompt": "a", "model": "/etc/passwd"}}, 404, "not served here"),
]


@pytest.mark.parametrize("name, kwargs, status, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, name, kwargs, status, message):
    url, _ = server
    r = requests.post(f"{url}/v1/completions", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    ok = complete(url, prompt="ROMEO:", max_tokens=3, seed=1)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 3


def generated_tokens(url: str) -> float:
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^gpt_generation_tokens_total (\S+)$", metrics, re.M).group(1))


def test_disconnect_mid_stream_frees_the_slot_and_stops_generating(server):
    """A client that goes away mid-stream is cancelled: its slot is free long before its 100,000 tokens
    could have been generated (the tiny model makes a few thousand a second on one thread), and no
    token is generated for it after that."""
    url, _ = server
    before = generated_tokens(url)
    r = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 100_000, "stream": True},
                      stream=True, timeout=60)
    events = (line for line in r.iter_lines() if line.startswith(b"data: "))  # blank lines separate them
    next(events), next(events)  # a couple of chunks arrive
    assert requests.get(f"{url}/health").json()["active"] == 1
    r.close()  # the client goes away mid-generation
    deadline = time.time() + 5
    while requests.get(f"{url}/health").json()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert requests.get(f"{url}/health").json()["active"] == 0, "the slot was not freed 5 s after the disconnect"
    spent = generated_tokens(url) - before
    assert 2 <= spent < 50_000, spent
    time.sleep(0.5)
    assert generated_tokens(url) - before == spent


def requests_answered(url: str, status: int) -> float:
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^gpt_requests_total{{status="{status}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_non_streaming_client_that_goes_away_is_counted_499_and_frees_the_slot(server):
    """The client of a whole (non-streaming) answer closes its connection mid-generation: the server
    notices while tokens still flow, ends the request as 499 and stops generating for it."""
    url, _ = server
    before, answered = generated_tokens(url), requests_answered(url, 499)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 100_000}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(post_head(Content_Length=str(len(body))) + body)
        deadline = time.time() + 10
        while generated_tokens(url) - before < 50 and time.time() < deadline:  # it is generating
            time.sleep(0.02)
        assert requests.get(f"{url}/health").json()["active"] == 1
    deadline = time.time() + 5
    while requests.get(f"{url}/health").json()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert requests.get(f"{url}/health").json()["active"] == 0, "the slot was not freed 5 s after the disconnect"
    spent = generated_tokens(url) - before
    assert spent < 50_000 and requests_answered(url, 499) == answered + 1, (spent, answered)


def test_a_request_past_its_time_ends_with_what_it_has_as_length(export_dir):
    """--max-request-seconds: a request still generating then is retired with finish reason "length"
    and the tokens it has, not run on to its max_tokens."""
    from fastapi.testclient import TestClient

    from serve.server import Limits, create_app

    model = OnnxModel(export_dir, threads=1)
    with TestClient(create_app(model, Limits(max_request_seconds=1.0, max_new_tokens=100_000), "tiny")) as client:
        started = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 100_000})
        took = time.monotonic() - started
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert 0 < body["usage"]["completion_tokens"] < 100_000 and took < 10, (body["usage"], took)


def test_a_stuck_model_loop_answers_504_instead_of_a_wait_without_end(export_dir, monkeypatch):
    """If the model loop stops making progress, a request gets a 504 once its time and the grace are
    over (the grace is 0 here), naming the limit."""
    from fastapi.testclient import TestClient

    from serve import server
    from serve.server import Limits, create_app

    monkeypatch.setattr(server, "DEADLINE_GRACE_S", 0.0)
    model = OnnxModel(export_dir, threads=1)
    real_run, release = model.run, threading.Event()

    def stuck(*args, **kwargs):
        release.wait(30)
        return real_run(*args, **kwargs)

    model.run = stuck
    answers = []
    with TestClient(create_app(model, Limits(max_request_seconds=0.5), "tiny")) as client:
        waiting = threading.Thread(target=lambda: answers.append(
            client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5})))
        waiting.start()
        waiting.join(timeout=10)
        answered_in_time = bool(answers)
        release.set()  # the loop goes on: a request still waiting now ends one way or another
        waiting.join(timeout=60)
    assert answered_in_time, f"no answer 10 s into a request of 0.5 s; later: {answers}"
    error = answers[0].json()["error"]
    assert answers[0].status_code == 504 and error["code"] == "timeout", (answers[0].status_code, error)
    assert error["message"] == "the model loop did not finish this request within 0.5 s"


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-prompts", "0"], "--max-prompts must be >= 1"),
    (["--read-timeout", "inf"], "--read-timeout=inf must be a positive number of seconds"),
    (["--max-request-seconds", "0"], "--max-request-seconds=0.0 must be a positive number of seconds"),
])
def test_a_limit_flag_that_makes_no_sense_is_one_line_before_the_model_loads(flags, message, capsys, tmp_path):
    from serve.server import run

    assert run([str(tmp_path / "no-export-here"), *flags]) == 2  # refused before the folder is read
    assert capsys.readouterr().err == f"error: {message}\n"


def test_model_id_max_prompts_and_stop_strings(export_dir):
    """--model-id names the model clients ask for; --max-prompts bounds a request's prompts; stop takes
    up to 4 non-empty strings."""
    proc, url = start_server(export_dir, "--model-id", "bard", "--max-prompts", "2")
    try:
        assert [m["id"] for m in requests.get(f"{url}/v1/models").json()["data"]] == ["bard"]
        assert complete(url, prompt="ROMEO:", max_tokens=2, model="bard").status_code == 200
        other = complete(url, prompt="ROMEO:", max_tokens=2, model=export_dir.name)
        assert other.status_code == 404 and "this server serves 'bard'" in other.json()["error"]["message"]
        assert complete(url, prompt=["A", "B"], max_tokens=2).status_code == 200
        three = complete(url, prompt=["A", "B", "C"], max_tokens=2)
        assert three.status_code == 400 and "a list of 1 to 2 of them" in three.json()["error"]["message"]
        for stop in (["a", "b", "c", "d", "e"], [""]):
            r = complete(url, prompt="ROMEO:", max_tokens=2, stop=stop)
            assert r.status_code == 400 and r.json()["error"] == {
                "message": "stop must be up to 4 non-empty strings", "type": "invalid_request_error",
                "param": "stop", "code": None}, stop
        assert complete(url, prompt="ROMEO:", max_tokens=2, stop=["a", "b", "c", "d"]).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_memory_stays_flat_over_1000_requests(server):
    url, proc = server
    session = requests.Session()

    def burst(count):
        for i in range(count):
            r = session.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4, "seed": i,
                                                             "stream": i % 2 == 0}, timeout=30)
            assert r.status_code == 200

    burst(100)
    after_100 = rss_kb(proc.pid)
    burst(900)
    after_1000 = rss_kb(proc.pid)
    assert after_1000 - after_100 < 5 * 1024, (after_100, after_1000)


def test_api_key_from_the_environment_and_a_full_queue(export_dir):
    proc, url = start_server(export_dir, "--max-queue", "2", "--max-batch", "1", GPT_API_KEY="s3cret")
    try:
        assert requests.get(f"{url}/v1/models").status_code == 401
        r = requests.post(f"{url}/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=auth).ok
        # a request that could never fit is the client's error, not a reason to retry
        r = requests.post(f"{url}/v1/completions", json={"prompt": "a", "n": 3}, headers=auth)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "n" and "limit of 2" in error["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "warning" not in proc.stdout.read()


def test_a_queue_that_is_full_now_answers_429(export_dir):
    from fastapi.testclient import TestClient

    from serve.server import Limits, create_app

    model = OnnxModel(export_dir, threads=1)
    real_run = model.run

    def slow_run(*args, **kwargs):  # a model slow enough that the first request is still running
        time.sleep(0.05)
        return real_run(*args, **kwargs)

    model.run = slow_run
    with TestClient(create_app(model, Limits(max_queue=2, max_batch=1), "tiny")) as client:
        first = threading.Thread(target=client.post, args=("/v1/completions",),
                                 kwargs={"json": {"prompt": "a", "n": 2, "max_tokens": 20}})
        first.start()
        deadline = time.time() + 10
        while client.get("/health").json()["active"] < 2:
            assert time.time() < deadline
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        first.join(timeout=30)
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_an_api_key_given_as_a_flag_is_accepted_with_a_warning(export_dir):
    proc, url = start_server(export_dir, "--api-key", "s3cret")
    try:
        assert requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}).ok
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "--api-key is visible to every user of this machine in the process list; set GPT_API_KEY" in \
        proc.stdout.read()


def test_a_tiny_temperature_is_greedy_not_nan(server, expected):
    url, _ = server
    r = complete(url, prompt="ROMEO:", max_tokens=20, temperature=1e-310, seed=4)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("ROMEO:", 20, 4, temperature=0.0)


# --- hostile clients: bytes, time and connections -------------------------------------------------

def read_all(s: socket.socket) -> bytes:
    """Everything the server sends on a connection until it closes it."""
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def raw(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server answers before closing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(s)


def post_head(path="/v1/completions", **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int = 1 << 16) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def sent_before_the_answer(url: str, head: bytes, body: bytes, piece: int = 1 << 16) -> tuple[int, bytes]:
    """Send head and body a piece at a time, looking for an answer after each: (body bytes sent when the
    server answered or stopped reading, its answer)."""
    import select

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        sent = 0
        while sent < len(body):
            if select.select([s], [], [], 0.005)[0]:
                break
            try:
                s.sendall(body[sent:sent + piece])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(body[sent:sent + piece])
        return sent, read_all(s)


def test_a_chunked_body_is_counted_as_it_arrives(server):
    """An 8 MB body claiming no length is refused once 1 MB of it has come: the 413 arrives while the
    client still has most of it to send. A server that read it all, then answered 413, fails."""
    url, _ = server
    small = json.dumps({"prompt": "ROMEO:", "max_tokens": 3, "seed": 1}).encode()
    ok = raw(url, post_head(Transfer_Encoding="chunked", Connection="close") + chunked(small))
    assert ok.startswith(b"HTTP/1.1 200")
    huge = chunked(json.dumps({"prompt": "a" * (8 << 20)}).encode())  # 8 MB
    sent, answer = sent_before_the_answer(url, post_head(Transfer_Encoding="chunked"), huge)
    assert answer.startswith(b"HTTP/1.1 413") and b"over 1048576 bytes" in answer
    assert sent < 4 << 20, f"the 413 came after {sent} of {len(huge)} bytes: the body was read whole first"
    assert complete(url, prompt="ROMEO:", max_tokens=3).status_code == 200


def test_content_length_and_transfer_encoding_together_are_refused(server):
    url, _ = server
    answer = raw(url, post_head(Content_Length="2", Transfer_Encoding="chunked") + chunked(b"{}" * 1000))
    assert answer.startswith(b"HTTP/1.1 400") and b"not both" in answer
    assert complete(url, prompt="ROMEO:", max_tokens=3).status_code == 200


@pytest.fixture(scope="module")
def strict_server(export_dir):
    """A server with a 1-second read timeout and room for 20 connections."""
    proc, url = start_server(export_dir, "--read-timeout", "1", "--max-connections", "20")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


def open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_half_sent_requests_are_closed_after_the_read_timeout(strict_server):
    url, proc = strict_server
    host, port = url.removeprefix("http://").split(":")
    baseline, settle = open_fds(proc.pid), time.time() + 1.2  # the read timeout closes what earlier tests left
    while time.time() < settle:
        time.sleep(0.1)
        baseline = min(baseline, open_fds(proc.pid))
    socks = []
    for i in range(15):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/compl" if i % 3 else post_head(Content_Length="100") + b'{"prompt": ')
        socks.append(s)
    held, deadline = 0, time.time() + 3  # the server accepts them all (it may be slow to, on a busy machine)
    while held < baseline + 15 and time.time() < deadline:
        time.sleep(0.05)
        held = max(held, open_fds(proc.pid))
    assert held >= baseline + 15
    assert requests.get(f"{url}/health", timeout=5).status_code == 200  # others are served meanwhile
    time.sleep(2.0)
    answers = [read_all(s) for s in socks]
    for s in socks:
        s.close()
    assert all(a == b"" for i, a in enumerate(answers) if i % 3)  # no headers in time: closed
    assert all(a.startswith(b"HTTP/1.1 408") for i, a in enumerate(answers) if not i % 3)  # body never came
    deadline = time.time() + 5
    while open_fds(proc.pid) > baseline + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert open_fds(proc.pid) <= baseline + 1


def test_past_the_connection_cap_the_idle_ones_go_first(strict_server):
    url, proc = strict_server
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(60)]
    for s in idle:
        s.sendall(b"GET /hea")
    try:
        for _ in range(5):  # every new client still gets through, the idle ones are shed
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
        assert complete(url, prompt="ROMEO:", max_tokens=3).status_code == 200
        assert open_fds(proc.pid) < 20 + 40
    finally:
        for s in idle:
            s.close()


def listeners(port: int) -> list[str]:
    """The local addresses listening on this TCP port, as the kernel lists them (hex, IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.append(local.rsplit(":", 1)[0])
    return found


def test_binds_to_loopback_by_default(export_dir):
    """Started without --host, the server listens on 127.0.0.1 alone: the kernel's socket table says so."""
    proc, url = start_server(export_dir)
    try:
        assert listeners(int(url.rsplit(":", 1)[1])) == ["0100007F"]  # 127.0.0.1, nothing else
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_failed_model_loop_answers_500_instead_of_hanging(export_dir, capfd):
    """If decoding ever raises, waiting requests end with a 500 and /health turns 503."""
    from fastapi.testclient import TestClient

    from serve.server import Limits, create_app

    model = OnnxModel(export_dir, threads=1)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    model.run = broken
    with TestClient(create_app(model, Limits(), "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5})
        message = r.json()["error"]["message"]
        assert r.status_code == 500 and "injected failure" not in message  # internals stay in the log
        error_id = re.search(r"error id (err-[0-9a-f]{12})", message).group(1)
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "error_id": error_id}
        again = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5})
        assert again.status_code == 500  # refused at once, not queued behind a dead loop
    log = capfd.readouterr().err
    assert f"[{error_id}] the model loop failed: RuntimeError: injected failure" in log and "Traceback" in log


def test_a_request_arriving_as_the_loop_dies_is_never_left_waiting(export_dir):
    """The failure path and submit() share one lock: each request is refused or woken, none hangs."""
    from fastapi.testclient import TestClient

    from serve.server import Limits, create_app

    model = OnnxModel(export_dir, threads=1)
    real_run, calls = model.run, []

    def dies_soon(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("injected failure")
        return real_run(*args, **kwargs)

    model.run = dies_soon
    statuses = []
    with TestClient(create_app(model, Limits(max_request_seconds=5), "tiny")) as client:
        def one(i):
            statuses.append(client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 50,
                                                                 "stream": i % 2 == 0}).status_code)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    assert len(statuses) == 16 and set(statuses) <= {200, 500}


def test_a_bpe_model_streams_whole_characters_equal_to_the_full_text(bpe_export_dir):
    proc, url = start_server(bpe_export_dir, "--max-new-tokens-limit", "64")
    try:
        prompt = "Ça va? naïve 日本 — ROMEO:"
        body = {"prompt": prompt, "max_tokens": 60, "seed": 9, "temperature": 1.3}
        whole = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
        r = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
        pieces = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
        assert "".join(pieces) == whole["choices"][0]["text"]
        assert whole["usage"]["prompt_tokens"] == len(OnnxModel(bpe_export_dir).tokenizer.encode(prompt))
        model = OnnxModel(bpe_export_dir, threads=1)
        expected = "".join(e.text for e in generate(model, prompt, 60, SamplingParams(temperature=1.3), 9))
        assert whole["choices"][0]["text"] == expected
        long = requests.post(f"{url}/v1/completions", json={"prompt": "ab " * 9000}, timeout=60)
        assert long.status_code == 400 and "over the limit of 8192" in long.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_step_admits_prompts_up_to_its_prefill_budget_and_scored_prompts_beside_them(export_dir):
    """Sequences that arrive together join over several steps, PREFILL_TOKENS of prompt at most a step
    (one at least, however long), so those already decoding wait one step's prefill; a scoring request's
    prompts never join the batch and are taken all at once."""
    from serve.batch import Sequence
    from serve.scheduler import PREFILL_TOKENS, Limits, Scheduler

    scheduler = Scheduler(OnnxModel(export_dir, threads=1), Limits())
    long, short = [1] * (PREFILL_TOKENS - 100), [1] * 150
    scheduler.waiting.extend([Sequence(long, 5), Sequence(short, 5), Sequence(short, 5), Sequence(long + long, 5)])
    assert [len(s.prompt_ids) for s in scheduler._take(16)] == [len(long), len(short)]  # the second passes it
    assert [len(s.prompt_ids) for s in scheduler._take(1)] == [len(short)]  # room for one
    assert [len(s.prompt_ids) for s in scheduler._take(16)] == [2 * len(long)]  # one at least, however long
    scored, last = [Sequence(long, 0, score_prompt=True, logprobs=1) for _ in range(8)], Sequence(short, 5)
    scheduler.waiting.extend([*scored, last])
    taken = scheduler._take(16)
    assert len(taken) == 9 and all(a is b for a, b in zip(taken, [*scored, last])) and not scheduler.waiting
