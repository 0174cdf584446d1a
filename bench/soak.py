"""A bounded load-and-fault soak of the HTTP server on 127.0.0.1: does it keep serving, and give back
what it took?

    python bench/soak.py                          # a small random-weight export, 3 minutes
    python bench/soak.py --export-dir exports/X --duration 600

Starts `python -m serve.server` on loopback and runs, in order:
  1. quiet: well-formed clients alone (streaming and not), for the baseline latency;
  2. faults: the same clients, interleaved with clients that disconnect mid-stream, the catalogue
     of malformed requests, oversized bodies (declared and chunked), Content-Length together with
     Transfer-Encoding, half-sent request lines and bodies, bursts of idle connections, and a flood
     of prompts that share no prefix, against a prefix cache of --prefix-cache-mb;
  3. settle: the faults stop; idle connections must be closed by the server's read timeout.

It prints requests served, responses by status class, unexpected 5xx (goal 0), the server's RSS
and open file descriptors at the start of the faults and after settling (goal: under 5% growth,
descriptors back to baseline), and the p50/p99 latency of well-formed requests during the faults
against the quiet baseline; whether /metrics counted every response the clients got (goal: each one),
and whether the prefix cache stayed within its bound (goal) while evicting. Exit status 1 if a goal
is missed. Every loop is bounded in time and count, and every connection goes to 127.0.0.1 only.

    python bench/soak.py --clients 32 --duration 120     # 32 well-formed clients beside the faults
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench.common import add_shape_arguments, family, machine, make_export, wait_healthy  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "O", "KING HENRY:"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    """Thread-safe counts of responses, with the latencies of well-formed requests by phase."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: Counter = Counter()
        self.unexpected: list[str] = []
        self.latency: dict[str, list[float]] = {"quiet": [], "faults": []}
        self.phase = "quiet"

    def record(self, kind: str, status: int | str, expected: set, seconds: float | None = None) -> None:
        with self.lock:
            self.status[f"{status // 100}xx" if isinstance(status, int) else status] += 1
            if status not in expected:
                self.unexpected.append(f"{kind}: {status}")
            if seconds is not None:
                self.latency[self.phase].append(seconds)


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples (every label) in the server's /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def raw_exchange(port: int, data: bytes, timeout: float) -> int | str:
    """Send bytes on a new connection; the HTTP status the server answered, or 'closed'."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        answer = b""
        try:
            while len(answer) < 12 and (chunk := s.recv(4096)):
                answer += chunk
        except OSError:
            pass
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "closed"


def head(length: int | None = None, chunked: bool = False) -> bytes:
    lines = ["POST /v1/completions HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunks(body: bytes, size: int = 1 << 16) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def malformed(url: str, port: int, rng: random.Random) -> tuple[str, int | str, set]:
    """One request from the catalogue of bad input: (name, status, statuses that are right)."""
    post = f"{url}/v1/completions"
    choice = rng.randrange(10)
    if choice == 0:
        r = requests.post(post, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
        return "bad json", r.status_code, {400}
    if choice == 1:
        r = requests.post(post, json={"prompt": "a", "max_tokens": "ten"}, timeout=30)
        return "wrong type", r.status_code, {400}
    if choice == 2:
        r = requests.post(post, json={"prompt": "a", "best_of": 3}, timeout=30)
        return "unknown field", r.status_code, {400}
    if choice == 3:
        return "out of vocabulary", requests.post(post, json={"prompt": "caf\u00e9"}, timeout=30).status_code, {400}
    if choice == 4:
        r = requests.post(post, json={"prompt": "a", "n": 10_000}, timeout=30)
        return "n too large", r.status_code, {400}
    if choice == 5:
        body = json.dumps({"prompt": "a" * (2 << 20)}).encode()
        return "oversized body", raw_exchange(port, head(len(body)) + body, 30), {413, "closed"}
    if choice == 6:
        body = json.dumps({"prompt": "a" * (4 << 20)}).encode()
        return "oversized chunked body", raw_exchange(port, head(chunked=True) + chunks(body), 30), {413, "closed"}
    if choice == 7:
        body = chunks(b"{}" * 5000)
        return "length and chunked", raw_exchange(port, head(2, chunked=True) + body, 30), {400}
    if choice == 8:
        return "half a body", raw_exchange(port, head(500) + b'{"prompt": "RO', 30), {408}
    r = requests.post(post, json={"prompt": "a", "temperature": 1e-310, "max_tokens": 2}, timeout=30)
    return "tiny temperature", r.status_code, {200}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", default=None, help="default: a random-weight export of the size below")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of quiet + faults (default 180)")
    parser.add_argument("--clients", type=int, default=4, help="well-formed clients (default 4)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--idle-burst", type=int, default=100, help="idle connections per burst (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads in the server (default 1)")
    parser.add_argument("--read-timeout", type=float, default=3.0, help="the server's --read-timeout")
    add_shape_arguments(parser, layers=4, heads=4, dim=128, block=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-cache-mb", type=float, default=1.0,
                        help="the server's prefix cache, small so that the flood of prefixes fills it (default 1)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    quiet_s = max(10.0, args.duration / 4)
    fault_s = max(10.0, args.duration - quiet_s)

    with tempfile.TemporaryDirectory() as tmp:
        # with the fused graph, which the server takes by default (its slots of one preallocated cache)
        export_dir = Path(args.export_dir) if args.export_dir else make_export(Path(tmp), args.layers, args.heads,
                                                                              args.dim, args.block, family(args),
                                                                              optimize=True)
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        log = open(Path(tmp) / "server.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "serve.server", str(export_dir), "--port", str(port),
                                   "--threads", str(args.threads), "--max-queue", "256", "--max-connections", "256",
                                   "--read-timeout", str(args.read_timeout), "--prefix-cache-mb",
                                   str(args.prefix_cache_mb)], cwd=ROOT, env=env, stderr=log)
        url = f"http://{HOST}:{port}"
        tally = Tally()
        stop = threading.Event()
        try:
            if not wait_healthy(url):
                raise SystemExit("the server did not start: " + log.read())
            counted_before = metric(url, "gpt_requests_total")  # this scrape is counted after it

            def good_client(c: int) -> None:
                session, i = requests.Session(), 0
                while not stop.is_set() and i < 100_000:
                    i += 1
                    stream = i % 2 == 0
                    body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": args.max_tokens,
                            "seed": c * 100_000 + i, "stream": stream}
                    start = time.perf_counter()
                    try:
                        r = session.post(f"{url}/v1/completions", json=body, timeout=120, stream=stream)
                        if stream:
                            for _ in r.iter_lines():
                                pass
                        tally.record("well-formed", r.status_code, {200}, time.perf_counter() - start)
                    except requests.RequestException as e:
                        tally.record("well-formed", type(e).__name__, set())

            def disconnector() -> None:
                i = 0
                while not stop.is_set() and i < 100_000:
                    i += 1
                    try:
                        r = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 200,
                                                                         "stream": True}, stream=True, timeout=60)
                        lines = r.iter_lines()
                        for _ in range(rng.randrange(1, 6)):
                            next(lines, None)
                        r.close()  # gone mid-stream
                        tally.record("disconnect mid-stream", r.status_code, {200})
                    except requests.RequestException as e:
                        tally.record("disconnect mid-stream", type(e).__name__, set())
                    stop.wait(0.2)

            def bad_client() -> None:
                local, i = random.Random(args.seed + 1), 0
                while not stop.is_set() and i < 100_000:
                    i += 1
                    try:
                        name, status, ok = malformed(url, port, local)
                        tally.record(name, status, ok)
                    except (requests.RequestException, OSError) as e:
                        tally.record("malformed", type(e).__name__, set())
                    stop.wait(0.05)

            def flooder() -> None:  # prompts sharing no prefix: the prefix cache must evict, never grow
                local, i = random.Random(args.seed + 2), 0
                while not stop.is_set() and i < 100_000:
                    i += 1
                    prompt = "".join(local.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(150))
                    try:
                        r = requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1},
                                          timeout=60)
                        tally.record("prefix flood", r.status_code, {200})
                    except requests.RequestException as e:
                        tally.record("prefix flood", type(e).__name__, set())

            def idler() -> None:
                bursts = 0
                while not stop.is_set() and bursts < 1000:
                    bursts += 1
                    held = []
                    for j in range(args.idle_burst):
                        try:
                            s = socket.create_connection((HOST, port), timeout=5)
                            s.sendall(b"POST /v1/compl" if j % 2 else b"")  # half a request line, or nothing
                            held.append(s)
                        except OSError:
                            break
                    stop.wait(args.read_timeout * 2)  # the server should close them meanwhile
                    for s in held:
                        s.close()

            goods = [threading.Thread(target=good_client, args=(c,), daemon=True) for c in range(args.clients)]
            for t in goods:
                t.start()
            time.sleep(quiet_s)
            rss_start, fds_start = rss_kb(server.pid), open_fds(server.pid)
            tally.phase = "faults"
            faults = [threading.Thread(target=f, daemon=True) for f in (disconnector, bad_client, idler, flooder)]
            for t in faults:
                t.start()
            time.sleep(fault_s)
            stop.set()
            for t in goods + faults:
                t.join(timeout=180)
            time.sleep(args.read_timeout + 2)  # settle: idle connections time out, streams are retired
            health = requests.get(f"{url}/health", timeout=5).json()
            rss_end, fds_end = rss_kb(server.pid), open_fds(server.pid)
            # less the first scrape (counted once it had answered) and the /health above
            counted = metric(url, "gpt_requests_total") - counted_before - 2
            prefix = {name: metric(url, f"gpt_prefix_cache_{name}") for name in ("bytes", "evictions_total",
                                                                                   "hits_total")}
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.seek(0)
            server_log = log.read()
        manifest = json.loads((export_dir / "manifest.json").read_text())["model"]

    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    quiet, noisy = tally.latency["quiet"], tally.latency["faults"]
    served = sum(tally.status.values())
    unexpected_5xx = [u for u in tally.unexpected if u.split(": ")[-1].startswith("5")]
    rss_growth = (rss_end - rss_start) / rss_start
    print(f"machine: {machine()}")
    print(f"server onnxruntime threads {args.threads}; model {manifest['num_layers']} layers, "
          f"{manifest['embedding_dim']}-d, block {manifest['block_size']}")
    print(f"phases: quiet {quiet_s:.0f} s, faults {fault_s:.0f} s; {args.clients} well-formed clients, "
          f"{args.max_tokens} tokens each; idle bursts of {args.idle_burst}; read timeout {args.read_timeout:g} s")
    print(f"requests: {served}; by status: {dict(sorted(tally.status.items()))}")
    print(f"unexpected responses: {len(tally.unexpected)} {Counter(tally.unexpected).most_common(5)}")
    print(f"unexpected 5xx: {len(unexpected_5xx)} (goal 0)")
    print(f"RSS: {rss_start / 1024:.1f} MB at the start of the faults, {rss_end / 1024:.1f} MB after settling "
          f"({rss_growth:+.1%}; goal under +5%)")
    print(f"open descriptors: {fds_start} at the start of the faults, {fds_end} after settling "
          "(goal: back to baseline)")
    print(f"well-formed latency p50/p99: quiet {pct(quiet, 50):.0f}/{pct(quiet, 99):.0f} ms ({len(quiet)} requests), "
          f"during faults {pct(noisy, 50):.0f}/{pct(noisy, 99):.0f} ms ({len(noisy)} requests); ratio p50 "
          f"{pct(noisy, 50) / pct(quiet, 50):.2f}x, p99 {pct(noisy, 99) / pct(quiet, 99):.2f}x")
    print(f"server health after: {health['status']}, {health.get('active')} active; "
          f"{server_log.count('Traceback')} tracebacks in its log")
    answered = sum(n for key, n in tally.status.items() if key.endswith("xx"))
    print(f"/metrics counted {counted:.0f} responses; the clients got {answered} (goal: the same)")
    bound = args.prefix_cache_mb * 2**20
    print(f"prefix cache: {prefix['bytes'] / 2**20:.2f} MiB held after the flood (bound {args.prefix_cache_mb:g} MiB), "
          f"{prefix['evictions_total']:.0f} blocks evicted, {prefix['hits_total']:.0f} hits")
    ok = (not unexpected_5xx and rss_growth < 0.05 and fds_end <= fds_start and health["status"] == "ok"
          and counted == answered and prefix["bytes"] <= bound and prefix["evictions_total"] > 0)
    print("goals met" if ok else "goals MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
