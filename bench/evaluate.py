"""Evaluation in-process against evaluation over the HTTP API, on the same text in the same run.

    python bench/evaluate.py --export-dir exports/shakespeare_char_cpu   # the first 200 KB of TinyShakespeare
    python bench/evaluate.py --export-dir EXPORT --text FILE            # your own text
    python bench/evaluate.py                      # a seed-size export with random weights, 200 KB of text

TinyShakespeare is found as training finds it ($GPT_DATA_DIR, the cache, the checked download).

serve.evaluate scores the text with the fp32 model in rolling windows. The API run starts
`python -m serve.server` on loopback and sends the same windows as lm-evaluation-harness's
local-completions model does (each window's tokens as a token-id prompt, echo, logprobs 1, one
request at a time, 1 or 16 windows per request as its batch_size), with max_tokens 1 (what lm-eval
0.4 asks for: a token it drops, which costs the server a second forward pass per window) and 0
(nothing generated), then sums the returned log-probabilities. All must give the same total; the
ratio of the times is what the API costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import add_shape_arguments, family, machine, make_export, wait_healthy  # noqa: E402


def windows(n: int, block: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over ids[0:n] (ids[0] the end-of-text token): (first, end, scored before)."""
    out, scored = [], 0
    while scored < n - 1:
        end = min(scored + block, n - 1)
        out.append((max(0, end - block), end, scored))
        scored = end
    return out


def over_the_api(url: str, model_id: str, ids: list[int], block: int, batch: int,
                 max_tokens: int) -> tuple[float, float]:
    """(total logprob, seconds) of `ids[1:]`, scored window by window as lm-eval's rolling task asks:
    `batch` windows per request (its batch_size), one request at a time. lm-eval 0.4 asks for
    max_tokens 1 and drops that token; with max_tokens 0 nothing is generated."""
    session, total, started = requests.Session(), 0.0, time.perf_counter()
    plan = windows(len(ids), block)
    for k in range(0, len(plan), batch):
        group = plan[k:k + batch]
        body = {"model": model_id, "prompt": [ids[first:end + 1] for first, end, _ in group],
                "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0}
        choices = sorted(session.post(f"{url}/v1/completions", json=body, timeout=600).json()["choices"],
                         key=lambda c: c["index"])
        for (first, _, scored), choice in zip(group, choices):
            entries = choice["logprobs"]["token_logprobs"]
            total += sum(entries[scored - first + 1:len(entries) - max_tokens])
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", default=None, help="an export folder (default: a seed-size random export)")
    parser.add_argument("--text", default=None, help="the text (default: the first 200 KB of TinyShakespeare)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64],
                        help="windows per request, as lm-eval's batch_size (default: 1, 16 and 64)")
    add_shape_arguments(parser)
    args = parser.parse_args()

    from gpt.config import DataConfig
    from gpt.datasets import resolve_corpus
    from serve.evaluate import scored_text
    from serve.runtime import OnnxModel
    from serve.scoring import Scorer

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(args.export_dir) if args.export_dir else make_export(
            Path(tmp), args.layers, args.heads, args.dim, args.block, family(args))
        text = Path(args.text).read_text(encoding="utf-8") if args.text else \
            resolve_corpus(DataConfig()).read_text(encoding="utf-8")[:200_000]
        model = OnnxModel(export_dir, variant="fp32", threads=args.threads)
        ids, _ = scored_text(model.tokenizer, text)
        started = time.perf_counter()
        local = Scorer(model).score(ids).total
        local_s = time.perf_counter() - started
        print(f"serve.evaluate (in-process, fp32, {args.threads} threads): {len(ids) - 1:,} tokens in {local_s:.1f} s "
              f"({(len(ids) - 1) / local_s:,.0f} tokens/s), total logprob {local:.3f}")
        del model
        port = 8000 + os.getpid() % 1000
        most = max(args.batches)
        server = subprocess.Popen([sys.executable, "-m", "serve.server", str(export_dir), "--model", "fp32",
                                   "--port", str(port), "--threads", str(args.threads), "--model-id", "bench",
                                   "--max-prompts", str(most), "--max-queue", str(max(64, most))],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            if not wait_healthy(url):
                raise SystemExit("the server did not start")
            block = requests.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
            for batch in args.batches:
                for max_tokens in (1, 0):
                    remote, remote_s = over_the_api(url, "bench", ids, block, batch, max_tokens)
                    print(f"over the API (windows of {block} tokens, {batch} per request, max_tokens {max_tokens}): "
                          f"{remote_s:.1f} s ({(len(ids) - 1) / remote_s:,.0f} tokens/s), total logprob {remote:.3f}")
                    print(json.dumps({"windows_per_request": batch, "max_tokens": max_tokens,
                                      "same_total": abs(remote - local) <= 1e-6 * abs(local),
                                      "api_time_over_in_process": round(remote_s / local_s, 2)}))
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
