"""Where one decode step's time goes: onnxruntime's own per-op profile, by graph and batch size.

    python bench/step_profile.py                    # seed size; portable fp32, fused fp32, fused int4; batch 1 and 8
    python bench/step_profile.py --batch 1 8 16 --context 200

Random weights (time does not depend on them). Each graph decodes one token per row after
`--context` cached tokens, bound as the runtime binds it (the fused graph's cache is one buffer,
past and present, written in place; the portable graph's past is copied into a new present by
Concat), with onnxruntime's profiler on. Prints the mean step time without the profiler, and with
it, the share of the ops that take the most. This is the evidence for what limits decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import add_shape_arguments, machine, random_checkpoint  # noqa: E402


def session(path: Path, threads: int, profile: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.parent / "profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bound_step(sess, config: dict, batch: int, context: int, shared: bool):
    """An IOBinding for one decode step of `batch` rows after `context` cached tokens."""
    L, H = config["num_layers"], config["num_heads"]
    D, M = config["embedding_dim"] // H, config["block_size"]
    binding = sess.io_binding()
    binding.bind_cpu_input("input_ids", np.zeros((batch, 1), np.int64))
    binding.bind_cpu_input("attention_mask", np.ones((batch, context + 1), np.int64))
    binding.bind_cpu_input("position_ids", np.full((batch, 1), context, np.int64))
    keep = []
    for i in range(L):
        for kv in ("key", "value"):
            a = np.zeros((batch, H, M if shared else context, D), np.float32)
            keep.append(a)
            if shared:
                binding.bind_input(f"past_key_values.{i}.{kv}", "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
                binding.bind_output(f"present.{i}.{kv}", "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
            else:
                binding.bind_cpu_input(f"past_key_values.{i}.{kv}", a)
                binding.bind_output(f"present.{i}.{kv}", "cpu")
    binding.bind_output("logits", "cpu")
    return binding, keep


def measure(path: Path, config: dict, batch: int, context: int, shared: bool, threads: int, steps: int) -> dict:
    sess = session(path, threads, profile=False)
    binding, keep = bound_step(sess, config, batch, context, shared)
    for _ in range(10):
        sess.run_with_iobinding(binding)
    start = time.perf_counter()
    for _ in range(steps):
        sess.run_with_iobinding(binding)
    step_ms = (time.perf_counter() - start) / steps * 1000

    sess = session(path, threads, profile=True)
    binding, keep = bound_step(sess, config, batch, context, shared)
    for _ in range(steps):
        sess.run_with_iobinding(binding)
    trace = sess.end_profiling()
    ops: dict[str, float] = defaultdict(float)
    with open(trace) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                ops[event["args"]["op_name"]] += event["dur"] / steps / 1000
    os.remove(trace)
    return {"step_ms": step_ms, "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=100, help="tokens cached before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    from export.pipeline import export

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _, _ = random_checkpoint(Path(tmp) / "checkpoint", args.layers, args.heads, args.dim, args.block)
        manifest = export(ckpt, Path(tmp) / "export", int4=True, optimize=True, eval_tokens=512, log=lambda s: None)
        config = manifest["model"]
        print(f"machine: {machine()}; {args.threads} threads")
        print(f"model {args.layers} layers, {args.dim}-d, block {args.block}; one decode step after {args.context} "
              "cached tokens; op times from onnxruntime's profiler (which adds its own overhead)")
        for variant in ("fp32", "fused", "fused-int4"):
            shared = manifest["graphs"][variant]["cache"] == "shared"
            for batch in args.batch:
                r = measure(Path(tmp) / "export" / manifest["files"][variant], config, batch, args.context, shared,
                            args.threads, args.steps)
                total = sum(r["ops_ms"].values())
                top = ", ".join(f"{op} {ms:.2f} ms ({ms / total:.0%})" for op, ms in list(r["ops_ms"].items())[:4])
                rate = batch / r["step_ms"] * 1000
                print(f"{variant:10s} batch {batch:2d}: {r['step_ms']:6.2f} ms/step ({rate:7.0f} tokens/s); "
                      f"profiled {total:5.2f} ms: {top}")


if __name__ == "__main__":
    run()
