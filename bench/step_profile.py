"""Where one decode step's time goes: onnxruntime's own per-op profile, by graph and batch size.

    python bench/step_profile.py                    # seed size; portable fp32, fused fp32, fused int4; batch 1 and 8
    python bench/step_profile.py --batch 1 8 16 --context 200
    python bench/step_profile.py --batch 1 --vocab 16384 --layers 12 --heads 12 --dim 768 --block 1024  # GPT-2 small

Random weights (time does not depend on them). Each graph decodes one token per row after
`--context` cached tokens, bound as the runtime binds it (the fused graph's cache is one buffer,
past and present, written in place; the portable graph's past is copied into a new present by
Concat), with onnxruntime's profiler on. Prints the mean step time without the profiler, and with
it, the share of the ops that take the most. This is the evidence for what limits decoding.

Then the kernel floor of the fused int4 graph at batch 1, in interleaved rounds: its whole step,
its MatMulNBits alone (the graph's own weights and attributes, one call per weight, and the same
bytes in two calls), and llama.cpp's q4_0 step on the same weights (when llama-cpp-python is
installed). What a step may take to decode at 1.3x llama.cpp is then set against what
onnxruntime's 4-bit kernels alone take.
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

from bench.common import add_shape_arguments, family, machine, random_checkpoint, settle  # noqa: E402
from bench.engines import EngineCrash, in_child  # noqa: E402


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


def timed(call, steps: int, warmup: int = 1) -> float:
    """Mean milliseconds of `call()` over `steps` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    return (time.perf_counter() - start) / steps * 1000


def measure(path: Path, config: dict, batch: int, context: int, shared: bool, threads: int, steps: int) -> dict:
    sess = session(path, threads, profile=False)
    binding, keep = bound_step(sess, config, batch, context, shared)
    step_ms = timed(lambda: sess.run_with_iobinding(binding), steps, warmup=10)

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


def kernel_graphs(path: Path, folder: Path) -> dict[str, Path]:
    """The fused int4 graph's MatMulNBits alone, with its own weights and attributes: "per weight" (one
    call per weight, as the graph makes them, each fed from an input of its width) and "two calls" (the
    same bytes as two calls of K = the model's width). Each graph ends in one Concat of the outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    width = min(a["K"] for a in attrs)
    as_rows = [(numpy_helper.to_array(weights[n.input[1]]), numpy_helper.to_array(weights[n.input[2]]), a)
               for n, a in zip(nodes, attrs)]
    # K = k * width is the same bytes as k times the rows at K = width: blocks run along K within a row
    packed = np.concatenate([b.reshape(a["N"] * a["K"] // width, -1, b.shape[-1]) for b, _, a in as_rows])
    scales = np.concatenate([s.reshape(a["N"] * a["K"] // width, -1) for _, s, a in as_rows])
    half = len(packed) // 2
    calls = {"per weight": [(b, s, a["N"], a["K"]) for b, s, a in as_rows],
             "two calls": [(packed[:half], scales[:half], half, width),
                           (packed[half:], scales[half:], len(packed) - half, width)]}
    common = {k: v for k, v in attrs[0].items() if k not in ("K", "N")}
    paths = {}
    for name, parts in calls.items():
        graph_nodes, inits, outputs = [], [], []
        for i, (b, s, n, k) in enumerate(parts):
            inits += [numpy_helper.from_array(b, f"b{i}"), numpy_helper.from_array(s.reshape(-1), f"s{i}")]
            graph_nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"b{i}", f"s{i}"], [f"y{i}"],
                                                domain="com.microsoft", K=k, N=n, **common))
            outputs.append(f"y{i}")
        graph_nodes.append(helper.make_node("Concat", outputs, ["y"], axis=2))
        ks = sorted({k for *_, k in parts})
        graph = helper.make_graph(graph_nodes, name, [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT,
                                                                                    [1, 1, k]) for k in ks],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, None])], inits)
        paths[name] = folder / f"kernels.{name.replace(' ', '-')}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=list(model.opset_import)), str(paths[name]))
    return paths


def kernel_floor(export_dir: Path, manifest: dict, ckpt: Path, args) -> None:
    """Ours against llama.cpp at the kernel: one decode step of the fused int4 graph, of its MatMulNBits
    alone, and of llama.cpp's q4_0 on the same weights; interleaved rounds, each its best."""
    config = manifest["model"]
    path = export_dir / manifest["files"]["fused-int4"]
    graphs = kernel_graphs(path, export_dir)
    rng, steps = np.random.default_rng(0), max(args.steps, 200)  # fewer move with the machine's noise

    def kernels(graph):
        sess = session(graph, args.threads, profile=False)
        binding = sess.io_binding()
        for i in sess.get_inputs():
            binding.bind_cpu_input(i.name, rng.random(i.shape, np.float32))
        binding.bind_output("y", "cpu")
        return lambda: timed(lambda: sess.run_with_iobinding(binding), steps)

    step = session(path, args.threads, profile=False)
    binding, keep = bound_step(step, config, 1, args.context, shared=True)
    rows = {"the graph's whole step": lambda: timed(lambda: step.run_with_iobinding(binding), steps)}
    rows |= {"its MatMulNBits, one call per weight": kernels(graphs["per weight"]),
             "the same weights in two calls": kernels(graphs["two calls"])}
    try:
        import llama_cpp

        from export.gguf import export_gguf

        export_gguf(ckpt, export_dir / "gguf", types=["q4_0"], log=lambda s: None)
        in_child("llama.cpp", "running model.q4_0.gguf", "bench.engines:llama_probe",  # a crash is a line
                 {"path": str(export_dir / "gguf" / "model.q4_0.gguf"), "n_ctx": config["block_size"],
                  "threads": args.threads, "prompt": args.context})
        llm = llama_cpp.Llama(model_path=str(export_dir / "gguf" / "model.q4_0.gguf"), n_ctx=config["block_size"],
                              n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        n = min(steps, config["block_size"] - args.context - 1)

        def llama_steps():  # from context - n/2 cached tokens, so the mean context is ours
            llm.reset()
            llm.eval([1] * (args.context - n // 2))
            return timed(lambda: llm.eval([1]), n - 1)

        rows["llama.cpp q4_0, a whole step"] = llama_steps
    except ImportError:
        print("llama-cpp-python not installed: its row is skipped")
    except EngineCrash as crash:
        print(f"llama.cpp q4_0: not measured: {crash}")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, measure_once in rows.items():
            settle()  # the row before has gone idle
            best[name] = min(best.get(name, float("inf")), measure_once())
    print(f"the kernel floor: fused int4, one decode step after {args.context} cached tokens, "
          f"best of {args.rounds} interleaved rounds")
    for name, ms in best.items():
        print(f"  {name:40s} {ms:6.3f} ms")
    if "llama.cpp q4_0, a whole step" in best:
        need = best["llama.cpp q4_0, a whole step"] / 1.3
        print(f"  decoding at 1.3x llama.cpp needs a step of {need:.3f} ms; onnxruntime's 4-bit kernels on these "
              f"weights take {best['its MatMulNBits, one call per weight'] / need:.0%} of it "
              f"({best['the same weights in two calls'] / need:.0%} in two calls)")


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=100, help="tokens cached before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the kernel floor, interleaved")
    parser.add_argument("--vocab", type=int, default=None, help="a byte-level BPE of this many tokens, tied head")
    args = parser.parse_args(argv)

    from export.pipeline import export

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _, _ = random_checkpoint(Path(tmp) / "checkpoint", args.layers, args.heads, args.dim, args.block,
                                       vocab=args.vocab, **family(args))
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
        kernel_floor(Path(tmp) / "export", manifest, ckpt, args)


if __name__ == "__main__":
    run()
