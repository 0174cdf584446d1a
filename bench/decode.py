"""Decoding speed, batch 1: the tutorial's way, PyTorch with the KV cache, ONNX Runtime fp32 and int8.

    python bench/decode.py                  # seed-size model (512-d, 8 heads, 8 layers, block 256)
    python bench/decode.py --threads 2 --new-tokens 200 --prompt 16

Random weights (speed does not depend on them). Every engine runs in this process, one after the
other, with the same thread count, greedy, on the same prompt; tokens/s counts the decode steps
after the first token. Batch-1 decoding reads every weight once per token, so memory bandwidth
bounds it: the script measures this machine's copy bandwidth and prints the achieved fraction of
(bandwidth / bytes of weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import VOCAB, machine, random_checkpoint  # noqa: E402
from gpt.generate import generate, generate_uncached  # noqa: E402
from gpt.sampling import SamplingParams  # noqa: E402


def copy_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Bytes moved per second by a large array copy (read + write), best of `repeats`."""
    a = np.ones(size_mb * (1 << 20) // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_stream(tokens) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after it, count) of an iterator of tokens."""
    start = time.perf_counter()
    first, n = None, 0
    for _ in tokens:
        n += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (n - 1) / (total - first), n


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slow recompute-everything baseline")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        measure(args, threads, Path(tmp))


def measure(args, threads: int, tmp: Path) -> None:
    from export.exporter import export
    from serve.runtime import OnnxModel
    from serve.runtime import generate as ort_generate

    ckpt, model, tokenizer = random_checkpoint(tmp / "checkpoint", args.layers, args.heads, args.dim, args.block)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, len(VOCAB), args.prompt).tolist()
    long_prompt = rng.integers(0, len(VOCAB), args.block).tolist()
    greedy = SamplingParams(greedy=True)

    started = time.time()
    manifest = export(ckpt, tmp / "export", int8=True, int4=True, int8_weights=True, log=lambda s: None)
    export_s = time.time() - started
    fp32 = OnnxModel(tmp / "export", threads=threads)
    int8 = OnnxModel(tmp / "export", threads=threads, variant="int8")
    int4 = OnnxModel(tmp / "export", threads=threads, variant="int4")
    int8w = OnnxModel(tmp / "export", threads=threads, variant="int8w")
    for m in (fp32, int8, int4, int8w):
        m.warmup()

    def ort(m, p):
        text = tokenizer.decode(p)
        return (e for e in ort_generate(m, text, args.new_tokens, greedy))

    bandwidth = copy_bandwidth()
    rows = []
    if not args.skip_uncached:
        rows.append(("PyTorch, recompute context",
                     time_stream(generate_uncached(model, prompt, args.new_tokens, greedy)),
                     time_stream(generate_uncached(model, long_prompt, 1, greedy))))
    list(generate(model, prompt, 5, greedy))  # warm up
    rows.append(("PyTorch, KV cache", time_stream(generate(model, prompt, args.new_tokens, greedy)),
                 time_stream(generate(model, long_prompt, 1, greedy))))
    rows.append(("ORT fp32, KV cache", time_stream(ort(fp32, prompt)), time_stream(ort(fp32, long_prompt))))
    rows.append(("ORT int8, KV cache", time_stream(ort(int8, prompt)), time_stream(ort(int8, long_prompt))))
    rows.append(("ORT int4 weights, KV cache", time_stream(ort(int4, prompt)), time_stream(ort(int4, long_prompt))))
    rows.append(("ORT int8 weights, KV cache", time_stream(ort(int8w, prompt)),
                 time_stream(ort(int8w, long_prompt))))

    bound = bandwidth / weight_bytes
    print(f"machine: {machine()}; {threads} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"model: {args.layers} layers, {args.heads} heads, {args.dim}-d, block {args.block}, vocab {len(VOCAB)}: "
          f"{weight_bytes / 1e6:.0f} MB of fp32 weights -> bandwidth bound {bound:.0f} tokens/s; "
          f"export+verify {export_s:.0f}s, parity {manifest['parity']['fp32']['max_rel_logit_error']:.1e}")
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, batch 1, greedy")
    print(f"{'engine':28s} {'tokens/s':>9s} {'vs cache':>9s} {'of bound':>9s} {'TTFT p' + str(args.prompt):>10s} "
          f"{'TTFT p' + str(args.block):>11s}")
    base = next(r[1][1] for r in rows if r[0] == "PyTorch, KV cache")
    results = {}
    for name, (ttft, rate, _), (long_ttft, _, _) in rows:
        print(f"{name:28s} {rate:9.1f} {rate / base:8.2f}x {rate / bound:8.0%} {ttft * 1000:8.1f}ms "
              f"{long_ttft * 1000:9.1f}ms")
        results[name] = {"tokens_per_s": rate, "ttft_ms": ttft * 1000, "ttft_long_ms": long_ttft * 1000}
    f, i = results["ORT fp32, KV cache"]["tokens_per_s"], results["ORT int8, KV cache"]["tokens_per_s"]
    print(f"ORT fp32 / PyTorch cache: {f / base:.2f}x (target 2.5x); ORT fp32 of bandwidth bound: {f / bound:.0%} "
          f"(target 80%); int8 / fp32: {i / f:.2f}x (target 3x)")
    print(json.dumps({"bandwidth_gb_s": bandwidth / 1e9, "bound_tokens_per_s": bound, **results}))


if __name__ == "__main__":
    run()
