"""Serving throughput and latency at concurrency 1, 8 and 32: does batching beat queueing?

    python bench/serve.py                         # exports a seed-size model (random weights) first
    python bench/serve.py --export-dir exports/X  # or use an existing export
    python bench/serve.py --models fused-int4 --concurrency 1 8

Starts `python -m serve.server` on loopback and runs C client threads, each sending streaming
completions one after another, prompts of random token ids of mixed lengths (`--prompt-lengths`).
Reports aggregate tokens/s across clients (tokens as the server's usage counts them), p50/p99 time
to first token and p50/p99 time between tokens, and the ratio of aggregate tokens/s at each
concurrency to concurrency 1 (the baseline: one client at a time), for each model in turn: the
portable graph (a cache rebuilt through the host as sequences join and leave) and the fused graph
(slots of one preallocated cache, written in place).

`--llama-server`: llama.cpp's server on the same weights, as Q4_0 (our GGUF export), with as many
slots as --max-batch and the same threads, measured with the same clients after ours
(bench/llama_server.py builds it once). The clients run on the same cores as the servers: on 2
cores they cost both alike. The goals compare our fused int4 with it at 8 and 32 clients:

    python bench/serve.py --models fused fused-int4 --llama-server --threads 2
    python bench/serve.py --models fused-int4 --llama-server --threads 2 --layers 12 --heads 12 --dim 768 \
        --block 1024 --vocab 50257 --requests-per-client 1          # GPT-2-small's shape

`--chat`: what the chat API adds. The export gets a plain chat template in its tokenizer_config.json
(as a user may add one; its markers are ordinary text, so any vocabulary takes it), and each model
streams the same greedy answer of --max-tokens tokens as /v1/chat/completions and as /v1/completions
of the same prompt tokens, 20 of each, in pairs: the time per token from the first piece of text
to the last, and chat's over the completion's.

`--prefix-tokens N`: what prefix reuse saves (serve/prefix.py). In each of 5 rounds two requests share
a prefix of N random token ids and differ in their last: the time to the first token of the second
over the first's (one token each, streamed). The portable graph, which has no prefix cache, is the
control. Needs a model whose block holds N + 1 tokens:

    python bench/serve.py --block 1024 --prefix-tokens 512 --concurrency 1 --requests-per-client 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench.common import add_shape_arguments, family, machine, make_export, wait_healthy  # noqa: E402


def stream_one(url: str, prompt: str | list[int], max_tokens: int, seed: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between later tokens, tokens) of one streaming request; tokens as the
    server counts them (usage, in the last chunk), the same for any tokenizer and either server."""
    start = time.perf_counter()
    r = requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "seed": seed,
                                                     "temperature": 0.8, "stream": True,
                                                     "stream_options": {"include_usage": True}}, stream=True,
                      timeout=600)
    r.raise_for_status()
    stamps, tokens = [], 0
    for line in r.iter_lines(chunk_size=None):  # as they arrive: 512 bytes at a time would bunch them
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return stamps[0] - start, list(np.diff(stamps)), tokens


def prompt_ids(client: int, i: int, vocab: int, room: int, lengths: list[int]) -> list[int]:
    """Request i of client c: random token ids, lengths[(c + i) % len(lengths)] of them (at most `room`),
    the same for both servers, never the last id (a BPE's end of text)."""
    rng = np.random.default_rng(1000 * client + i)
    return rng.integers(0, vocab - 1, min(lengths[(client + i) % len(lengths)], room)).tolist()


def load(url: str, concurrency: int, args, vocab: int, block: int) -> dict:
    requests_per_client, max_tokens = args.requests_per_client, args.max_tokens
    ttfts, gaps, tokens = [], [], [0]
    lock = threading.Lock()

    def client(c):
        for i in range(requests_per_client):
            prompt = prompt_ids(c, i, vocab, block - max_tokens, args.prompt_lengths)
            ttft, g, n = stream_one(url, prompt, max_tokens, seed=c * 1000 + i)
            with lock:
                ttfts.append(ttft)
                gaps.extend(g)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(ttfts), "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99)}


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[8, 64, 192],
                        help="prompt tokens of each client's requests in turn, client c starting at the c-th "
                        "(default 8 64 192: mixed)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads in the server (0: all cores)")
    parser.add_argument("--max-batch", type=int, default=32)
    add_shape_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="also measure what /v1/chat/completions adds per token")
    parser.add_argument("--prefix-tokens", type=int, default=0,
                        help="also measure the time to first token of a prompt whose first N tokens the previous one "
                        "had (0: not measured)")
    parser.add_argument("--models", nargs="+", default=["fp32", "fused", "fused-int4"],
                        help="the export's models to serve in turn (default: portable fp32, fused fp32, fused int4)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="a byte-level BPE of this many tokens (GPT-2's shape: --layers 12 --heads 12 --dim 768 "
                        "--block 1024 --vocab 50257); default the 65 characters")
    parser.add_argument("--llama-server", action="store_true",
                        help="also serve the same weights as Q4_0 with llama.cpp's llama-server, built first if it "
                        "is not in the cache (bench/llama_server.py)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(args.export_dir) if args.export_dir else make_export(
            Path(tmp), args.layers, args.heads, args.dim, args.block, family(args), optimize=True, int4=True,
            eval_tokens=512, vocab=args.vocab)
        if args.chat:
            export_dir = with_chat_template(export_dir, Path(tmp) / "chat")
        files = json.loads((export_dir / "manifest.json").read_text())["files"]
        models = [m for m in args.models if m in files]
        manifest = json.loads((export_dir / "manifest.json").read_text())["model"]
        results = {m: serve_and_load(export_dir, m, args, manifest) for m in models}
        if args.llama_server:
            if args.export_dir:
                raise SystemExit("--llama-server needs the benchmark's own random checkpoint: leave out --export-dir")
            results["llama-server q4_0"] = llama_server_load(Path(tmp), args, manifest)

    print(f"machine: {machine()}")
    print(f"server onnxruntime threads {args.threads or 'all'}, max batch "
          f"{args.max_batch}; model {manifest['num_layers']} layers, {manifest['embedding_dim']}-d, block "
          f"{manifest['block_size']}, vocabulary {manifest['vocab_size']}; prompts of random token ids, "
          f"{'/'.join(map(str, args.prompt_lengths))} tokens in turn, {args.max_tokens} new tokens each, streaming")
    skipped = [m for m in args.models if m not in models]
    if skipped:
        print(f"not in the export folder, skipped: {', '.join(skipped)}")
    print(f"{'model':>17s} {'clients':>7s} {'requests':>8s} {'tokens/s':>9s} {'vs 1':>6s} {'TTFT p50':>9s} "
          f"{'TTFT p99':>9s} {'token p50':>10s} {'token p99':>10s}")
    chat = {model: rows.pop() for model, rows in results.items() if args.chat}
    prefix = {model: rows.pop() for model, rows in results.items() if args.prefix_tokens}
    for model, rows in results.items():
        base = rows[0]["tokens_per_s"]
        for r in rows:
            print(f"{model:>17s} {r['concurrency']:7d} {r['requests']:8d} {r['tokens_per_s']:9.1f} "
                  f"{r['tokens_per_s'] / base:5.2f}x {r['ttft_p50_ms']:7.1f}ms {r['ttft_p99_ms']:7.1f}ms "
                  f"{r['gap_p50_ms']:8.1f}ms {r['gap_p99_ms']:8.1f}ms")
    for model, rows in results.items():
        eight = next((r for r in rows if r["concurrency"] == 8), None)
        if eight and rows[0]["concurrency"] == 1:
            ratio = eight["tokens_per_s"] / rows[0]["tokens_per_s"]
            print(f"{model}: 8 clients / 1 client aggregate tokens/s {ratio:.2f}x (goal >= 5x)")
    if "llama-server q4_0" in results and "fused-int4" in results:
        ours, theirs = ({r["concurrency"]: r for r in results[m]} for m in ("fused-int4", "llama-server q4_0"))
        for c in sorted(set(ours) & set(theirs)):
            print(f"{c} clients, ours (fused int4) / llama-server (q4_0): aggregate tokens/s "
                  f"{ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f}x (goal >= 1.3x at 8 and 32); "
                  f"TTFT p99 {ours[c]['ttft_p99_ms']:.0f} ms against {theirs[c]['ttft_p99_ms']:.0f} ms "
                  "(goal: no worse)")
    for model, p in prefix.items():
        print(f"{model}: a {args.prefix_tokens}-token shared prefix: TTFT of the second request "
              f"{p['second_ms']:.1f} ms / the first's {p['first_ms']:.1f} ms: median of 5 rounds' ratios "
              f"{p['ratio']:.2f}x (goal <= 0.2x)")
    for model, c in chat.items():
        print(f"{model}: streamed time per token, {args.max_tokens} greedy tokens: chat {c['chat_ms_per_token']:.3f} "
              f"ms, completion of the same prompt tokens {c['completion_ms_per_token']:.3f} ms: "
              f"median of 20 back-to-back pairs' ratios {c['ratio']:.3f}x (goal <= 1.05x)")
    print(json.dumps(results))


def per_token(url: str, messages: list[dict], rounds: int, tokens: int,
              temperature: float = 0.8) -> tuple[float, float, float]:
    """Seconds per streamed token, the median of each: a chat answer, and a completion of the same prompt
    tokens; and the median of the rounds' ratios (chat over completion), each round a pair back to back."""
    import requests

    ids = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    common = {"max_tokens": tokens, "temperature": temperature, "stream": True}

    def one(path, body):
        """From the first piece of text to the last, over the pieces between: the decode, not the prefill.
        Lines are read as they arrive (chunk_size=None), not 512 bytes at a time, which would bunch them."""
        stamps = []
        with requests.post(f"{url}{path}", json={**body, **common}, stream=True, timeout=600) as r:
            for line in r.iter_lines(chunk_size=None):
                if line.startswith(b"data: {"):
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)

    chat, completion = [], []
    for i in range(rounds):  # interleaved, each first in turn, so that the machine's drift falls on both alike
        pair = [("/v1/chat/completions", {"messages": messages, "seed": i}), ("/v1/completions", {"prompt": ids,
                                                                                                  "seed": i})]
        times = {path: one(path, body) for path, body in (pair if i % 2 == 0 else pair[::-1])}
        chat.append(times["/v1/chat/completions"])
        completion.append(times["/v1/completions"])
    ratio = float(np.median(np.array(chat) / np.array(completion)))
    return float(np.median(chat)), float(np.median(completion)), ratio


def shared_prefix(url: str, tokens: int, vocab: int, rounds: int = 5) -> dict:
    """Time to first token of two requests whose prompts share their first `tokens` token ids, the
    second just after the first, each round a new prefix: medians, and the median of the ratios."""
    rng = np.random.default_rng(0)
    first, second = [], []

    def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        with requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "stream": True},
                           stream=True, timeout=600) as r:
            r.raise_for_status()
            next(line for line in r.iter_lines(chunk_size=None) if line.startswith(b"data: {"))
            return time.perf_counter() - start

    for _ in range(rounds):
        shared = rng.integers(0, vocab, tokens).tolist()
        first.append(ttft(shared + [1]))
        second.append(ttft(shared + [2]))
    return {"first_ms": float(np.median(first)) * 1000, "second_ms": float(np.median(second)) * 1000,
            "ratio": float(np.median(np.array(second) / np.array(first)))}


def with_chat_template(export_dir: Path, copy: Path) -> Path:
    """A copy of the export whose tokenizer_config.json holds a chat template of plain text, its turn
    ending at a character no answer of --max-tokens greedy tokens need reach."""
    import shutil

    shutil.copytree(export_dir, copy)
    template = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:\n{% endif %}")
    path = copy / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, "chat_template": template, "eos_token": "$"}))
    return copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_load(tmp: Path, args, manifest: dict) -> list[dict]:
    """llama.cpp's llama-server on the same weights as Q4_0 (our GGUF export), with as many slots as our
    --max-batch, each of the model's context, and the same threads: each concurrency measured as ours."""
    from bench.llama_server import build, start
    from export.gguf import export_gguf

    binary = build()
    export_gguf(tmp / "checkpoint", tmp / "gguf", types=["q4_0"], log=lambda s: None)
    port = free_port()
    threads = args.threads or len(os.sched_getaffinity(0))
    server = start(binary, tmp / "gguf" / "model.q4_0.gguf", port, threads, args.max_batch, manifest["block_size"])
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, seconds=300):
            raise SystemExit("llama-server did not become healthy in 300 s")
        stream_one(url, [1, 2, 3], 8, 0)  # warm up
        return [load(url, c, args, manifest["vocab_size"], manifest["block_size"]) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait()


def serve_and_load(export_dir: Path, model: str, args, manifest: dict) -> list[dict]:
    """Start the server on one model of the folder, measure each concurrency, stop it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "serve.server", str(export_dir), "--port", str(port),
                               "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                               "--max-queue", "256", "--model", model], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url):
            raise SystemExit(f"the server serving {model} did not become healthy in 60 s")
        stream_one(url, "ROMEO:", 8, 0)  # warm up
        rows = [load(url, c, args, manifest["vocab_size"], manifest["block_size"]) for c in args.concurrency]
        if args.prefix_tokens:
            rows.append(shared_prefix(url, args.prefix_tokens, manifest["vocab_size"]))
        if args.chat:
            chat, completion, ratio = per_token(url, [{"role": "user", "content": "ROMEO:"}], 20, args.max_tokens,
                                                temperature=0.0)
            rows.append({"chat_ms_per_token": chat * 1000, "completion_ms_per_token": completion * 1000,
                         "ratio": ratio})
        return rows
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    run()
