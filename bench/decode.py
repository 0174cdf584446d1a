"""Decoding speed, batch 1: the tutorial's way, PyTorch with the KV cache, the portable and fused ONNX
graphs in fp32 and quantized, and onnxruntime-genai running the same export folder.

    python bench/decode.py                  # seed-size model (512-d, 8 heads, 8 layers, block 256)
    python bench/decode.py --threads 2 --new-tokens 200 --prompt 16
    python bench/decode.py --arch llama --layers 30 --heads 9 --kv-heads 3 --dim 576 --intermediate 1536 \
        --rope-theta 100000 --vocab 49152 --block 1024      # SmolLM2-135M's shape

Random weights (speed does not depend on them). Every engine runs in this process, in turn, for
`--rounds` round-robin rounds (each row is its best, so drift hits all alike), each once the one
before has gone idle (bench.common.settle), with the same thread count, greedy, on the same
prompt; tokens/s counts the decode steps after the first token; TTFT is
the time to the first token after a prompt of 16 and of block_size tokens (the long prompt: the
best of 3 in each round). onnxruntime-genai (when installed) runs the same model files through a
genai_config.json with the same thread count; the script checks that it produces the same greedy
tokens. Batch-1 decoding reads every weight once per token, so memory bandwidth bounds it: the
script measures this machine's copy bandwidth.
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

from bench.common import add_shape_arguments, family, machine, random_checkpoint, settle  # noqa: E402
from bench.engines import last_logits  # noqa: E402
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
    add_shape_arguments(parser)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slow recompute-everything baseline")
    parser.add_argument("--vocab", type=int, default=None,
                        help="a byte-level BPE of this many tokens and a tied head (GPT-2's layout); default: the "
                        "65-character vocabulary")
    parser.add_argument("--long-prompt", type=int, default=None, help="the prefill measured (default block_size)")
    parser.add_argument("--rounds", type=int, default=3, help="measure every engine this many times, round-robin; "
                        "each row is its best")
    parser.add_argument("--duel", action="store_true",
                        help="only the decode goal: our fused int4 against llama.cpp's q4_0, --rounds rounds in "
                        "alternating order, each round's ratio and their median")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        measure(args, threads, Path(tmp))


ENGINES = [  # (row, variant) of the project's runtime, in the order printed
    ("ORT portable fp32", "fp32"), ("ORT portable int8 (dynamic)", "int8"),
    ("ORT portable int4", "int4"), ("ORT portable int8 weights", "int8w"),
    ("ORT fused fp32", "fused"), ("ORT fused int8 (dynamic)", "fused-int8"),
    ("ORT fused int4", "fused-int4"), ("ORT fused int8 weights", "fused-int8w"),
]
GENAI = [("genai portable fp32", "fp32"), ("genai portable int8 (dynamic)", "int8"), ("genai fused fp32", "fused"),
         ("genai fused int4", "fused-int4")]
LLAMA = [("llama.cpp f32", "f32"), ("llama.cpp q8_0", "q8_0"), ("llama.cpp q4_0", "q4_0")]


def llama_engines(ckpt: Path, threads: int, block: int, prompt: int, tmp: Path, kinds=LLAMA) -> dict | None:
    """llama.cpp (llama-cpp-python) on the same weights: GGUF files written by `export --format gguf`;
    None when llama-cpp-python is not installed. Each file is first run in a child process as it will be
    measured (bench.engines.llama_probe): a type whose run dies of a signal on this host is left out
    with a line saying so, and the other rows are measured."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from bench.engines import EngineCrash, in_child
    from export.gguf import export_gguf

    export_gguf(ckpt, tmp / "gguf", types=[t for _, t in kinds], log=lambda s: None)
    engines = {}
    for name, t in kinds:
        path = tmp / "gguf" / f"model.{t}.gguf"
        try:
            in_child("llama.cpp", f"running {path.name} ({prompt}-token prompt, {threads} threads)",
                     "bench.engines:llama_probe",
                     {"path": str(path), "n_ctx": block, "threads": threads, "prompt": prompt})
        except EngineCrash as crash:
            print(f"{name}: not measured: {crash}")
            continue
        engines[name] = (llama_cpp.Llama(model_path=str(path), n_ctx=block, n_batch=block, n_threads=threads,
                                         n_threads_batch=threads, verbose=False), path.stat().st_size)
    return engines


def llama_stream(llm, prompt: list[int], n: int):
    """Greedy tokens from llama.cpp: the prompt evaluated at once, then one token per step."""
    llm.reset()
    llm.eval(prompt)
    for _ in range(n):
        token = int(last_logits(llm).argmax())
        yield token
        llm.eval([token])


def genai_engine(export_dir: Path, variant: str, threads: int, tmp: Path):
    """onnxruntime-genai running one model file of the export folder as it is (a folder of links to it
    with a genai_config.json for that file), or None when onnxruntime-genai is not installed."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    from export.genai import genai_config
    from serve.manifest import read_manifest

    manifest = read_manifest(export_dir)
    folder = tmp / f"genai-{variant}"
    folder.mkdir()
    name = manifest["files"][variant]
    (folder / name).symlink_to(export_dir / name)
    config = genai_config(manifest, variant, 0)  # a char model has no end token: min_length keeps genai going
    config["model"]["decoder"]["session_options"] |= {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return og.Model(str(folder))


def genai_stream(model, prompt: list[int], n: int):
    """Greedy tokens from onnxruntime-genai, one at a time (the prefill comes before the first)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    for _ in range(n):
        if generator.is_done():
            return
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def measure(args, threads: int, tmp: Path) -> None:
    from export.pipeline import export
    from serve.generate import generate as ort_generate
    from serve.generate import warmup
    from serve.runtime import OnnxModel

    ckpt, model, tokenizer = random_checkpoint(tmp / "checkpoint", args.layers, args.heads, args.dim, args.block,
                                               vocab=args.vocab, **family(args))
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size - (tokenizer.eot_id is not None)  # never the end-of-text token
    text = tokenizer.decode(rng.integers(0, vocab, 4 * args.block).tolist())
    ids = tokenizer.encode(text)  # ids that survive a decode and encode, as the engines take text or ids
    prompt, long_prompt = ids[:args.prompt], ids[:args.long_prompt or args.block]
    greedy = SamplingParams(greedy=True)

    started = time.time()
    if args.duel:
        export(ckpt, tmp / "export", int4=True, optimize=True, eval_tokens=1024, log=lambda s: None)
        duel(args, OnnxModel(tmp / "export", threads=threads, variant="fused-int4"),
             llama_engines(ckpt, threads, args.block, len(prompt), tmp, kinds=LLAMA[2:]), prompt, tokenizer)
        return
    manifest = export(ckpt, tmp / "export", int8=True, int4=True, int8_weights=True, optimize=True, eval_tokens=1024,
                      log=lambda s: None)
    export_s = time.time() - started
    engines = {name: OnnxModel(tmp / "export", threads=threads, variant=v) for name, v in ENGINES}
    for m in engines.values():
        warmup(m)

    def ort(m, p, n=args.new_tokens):
        return (e for e in ort_generate(m, tokenizer.decode(p), n, greedy))

    # Every engine is a (name, stream(prompt, n)) pair; all are measured in turn, `--rounds` times
    # round-robin, and each keeps its best: drift of the machine then hits them all alike.
    engines_list = []
    if not args.skip_uncached:
        engines_list.append(("PyTorch, recompute context",
                             lambda p, n: generate_uncached(model, p, n, greedy)))
    engines_list.append(("PyTorch, KV cache", lambda p, n: generate(model, p, n, greedy)))
    for name, m in engines.items():
        engines_list.append((name, lambda p, n, m=m: ort(m, p, n)))
    genai_note = "onnxruntime-genai not installed: its rows are skipped"
    same = {name: list(ort(m, prompt))[-1].sequence.generated for name, m in engines.items()}
    for name, variant in GENAI:
        g = genai_engine(tmp / "export", variant, threads, tmp)
        if g is None:
            break
        genai_note = ""
        engines_list.append((name, lambda p, n, g=g: genai_stream(g, p[:args.block - 1], n)))
        ours = next(n for n, v in ENGINES if v == variant)
        theirs = list(genai_stream(g, prompt, args.new_tokens))
        agree = theirs == same[ours][:len(theirs)]
        same[name] = "same greedy tokens" if agree else f"greedy tokens differ from {ours!r}"
    llamas = llama_engines(ckpt, threads, args.block, len(long_prompt), tmp)
    for name, (llm, _) in (llamas or {}).items():
        engines_list.append((name, lambda p, n, llm=llm: llama_stream(llm, p, n)))
        theirs = list(llama_stream(llm, prompt, args.new_tokens))
        twins = {"llama.cpp f32": "ORT fused fp32", "llama.cpp q8_0": "ORT fused int8 weights"}
        ours = twins.get(name, "ORT fused int4")
        agree = sum(a == b for a, b in zip(theirs, same[ours])) / len(theirs)
        same[name] = f"{agree:.0%} of greedy tokens as {ours!r} (random weights: near-ties flip)"
    for _, stream in engines_list:  # warm up
        list(stream(prompt, 5))
    bandwidth = copy_bandwidth()
    best: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, stream in engines_list:
            settle()  # the engine before has gone idle
            ttft, rate, _ = time_stream(stream(prompt, args.new_tokens))
            long_ttft = min(time_stream(stream(long_prompt, 1))[0] for _ in range(3))
            b = best.setdefault(name, [float("inf"), float("inf"), []])  # TTFTs: the best; rates: each round's
            best[name] = [min(b[0], ttft), min(b[1], long_ttft), b[2] + [rate]]
    rows = [(name, (b[0], max(b[2]), 0), (b[1], 0, 0)) for name, b in best.items()]

    bound = bandwidth / weight_bytes
    print(f"machine: {machine()}; {threads} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"model: {model.config.arch}, {args.layers} layers, {args.heads} heads ({model.config.kv_heads} key/value), "
          f"{args.dim}-d, MLP {model.config.mlp_dim}, block {args.block}, "
          f"vocab {tokenizer.vocab_size}{' (tied head)' if args.vocab else ''}: "
          f"{weight_bytes / 1e6:.0f} MB of fp32 weights -> fp32 bandwidth bound {bound:.0f} tokens/s; "
          f"export+verify {export_s:.0f}s, parity portable {manifest['parity']['fp32']['max_rel_logit_error']:.1e}, "
          f"fused {manifest['parity']['fused']['max_rel_logit_error']:.1e}")
    nodes = {v: manifest["graphs"][v]["nodes"] for v in ("fp32", "fused", "fused-int4")}
    print(f"graph nodes: portable {nodes['fp32']}, fused {nodes['fused']}, fused int4 {nodes['fused-int4']}")
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, batch 1, greedy; TTFT pN: a prompt of N tokens "
          f"(genai: {args.block - 1}, its context holds no more); best of {args.rounds} round-robin rounds")
    print(f"{'engine':32s} {'tokens/s':>9s} {'vs cache':>9s} {'TTFT p' + str(args.prompt):>10s} "
          f"{'TTFT p' + str(len(long_prompt)):>11s}")
    base = next(r[1][1] for r in rows if r[0] == "PyTorch, KV cache")
    results = {}
    for name, (ttft, rate, _), (long_ttft, _, _) in rows:
        note = same.get(name) if isinstance(same.get(name), str) else ""
        print(f"{name:32s} {rate:9.1f} {rate / base:8.2f}x {ttft * 1000:8.1f}ms {long_ttft * 1000:9.1f}ms  {note}")
        results[name] = {"tokens_per_s": rate, "ttft_ms": ttft * 1000, "ttft_long_ms": long_ttft * 1000,
                         "rounds_tokens_per_s": best[name][2]}
    if genai_note:
        print(genai_note)
    if llamas is None:
        print("llama-cpp-python not installed: its rows are skipped")
    else:
        llama_goals(results, llamas, manifest, tmp / "export", len(long_prompt))

    def rate(name):
        return results[name]["tokens_per_s"] if name in results else float("nan")

    portable = rate("ORT portable fp32")
    quantized = {n: rate(n) for n in ("ORT fused int8 (dynamic)", "ORT fused int4", "ORT fused int8 weights")}
    best = max(quantized, key=quantized.get)
    ttft_best = min((n for n, _ in ENGINES if n.startswith("ORT fused")), key=lambda n: results[n]["ttft_long_ms"])
    print("goals (issue 9, set for the seed size):")
    print(f"  best quantized fused ({best}) / portable fp32: {quantized[best] / portable:.2f}x (goal >= 3.5x)")
    print(f"  best quantized fused / genai on the portable int8 graph: "
          f"{quantized[best] / rate('genai portable int8 (dynamic)'):.2f}x (goal >= 2x)")
    print(f"  fused fp32 / portable fp32: {rate('ORT fused fp32') / portable:.2f}x (goal >= 1x)")
    print(f"  TTFT p{len(long_prompt)}, best fused ({ttft_best}) / portable fp32: "
          f"{results[ttft_best]['ttft_long_ms'] / results['ORT portable fp32']['ttft_long_ms']:.2f}x (goal <= 0.5x)")
    quality = manifest.get("quality", {})
    print("  validation-loss change (random weights, so only a smoke check; the CPU config's are in its manifest): " +
          ", ".join(f"{v} {q['val_loss_change']:+.4f}" for v, q in quality.items()
                    if isinstance(q, dict) and q.get("val_loss_change") is not None))
    print(json.dumps({"bandwidth_gb_s": bandwidth / 1e9, "bound_tokens_per_s": bound, **results}))


def duel(args, ours, llamas: dict | None, prompt: list[int], tokenizer) -> None:
    """The decode goal alone, as a duel: our fused int4 and llama.cpp's q4_0 decode the same prompt in
    turn, --rounds rounds, the first of each pair alternating, each pair once the machine is idle;
    on a host whose speed drifts, the ratio within a round is the figure, and the median of rounds."""
    from serve.generate import generate as ort_generate
    from serve.generate import warmup

    if not llamas or "llama.cpp q4_0" not in llamas:
        sys.exit("--duel needs llama-cpp-python (pip install -e '.[bench]') and a q4_0 that runs on this host")
    warmup(ours)
    greedy, text = SamplingParams(greedy=True), tokenizer.decode(prompt)
    engines = {"ORT fused int4": lambda: ort_generate(ours, text, args.new_tokens, greedy),
               "llama.cpp q4_0": lambda: llama_stream(llamas["llama.cpp q4_0"][0], prompt, args.new_tokens)}
    for stream in engines.values():
        list(stream())
    ratios = []
    print(f"machine: {machine()}; {args.threads or len(os.sched_getaffinity(0))} threads; prompt {len(prompt)} "
          f"tokens, {args.new_tokens} new tokens, batch 1, greedy")
    for r in range(args.rounds):
        rates = {}
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            settle()
            rates[name] = time_stream(engines[name]())[1]
        ratios.append(rates["ORT fused int4"] / rates["llama.cpp q4_0"])
        print(f"round {r + 1}: ours {rates['ORT fused int4']:.1f} tokens/s, llama.cpp q4_0 "
              f"{rates['llama.cpp q4_0']:.1f}: {ratios[-1]:.2f}x")
    print(f"decode, ours (ORT fused int4) / llama.cpp q4_0: median {np.median(ratios):.2f}x over {args.rounds} rounds "
          f"(goal >= 1.3x; rounds from {min(ratios):.2f}x to {max(ratios):.2f}x)")


def llama_goals(results: dict, llamas: dict, manifest: dict, export_dir: Path, long: int) -> None:
    """Ours against llama.cpp on the same weights, same run: decode, prefill, file size, quality (each
    goal whose llama.cpp row was measured: a type that crashed on this host has none)."""
    def rate(name):
        return results[name]["tokens_per_s"]

    print("goals (issue 20, against llama.cpp):")
    ours = max(("ORT fused int4", "ORT fused int8 weights", "ORT fused int8 (dynamic)"), key=rate)
    quantized = [n for n in ("llama.cpp q8_0", "llama.cpp q4_0") if n in llamas]
    if quantized:
        theirs = max(quantized, key=rate)
        per_round = [a / b for a, b in zip(results[ours]["rounds_tokens_per_s"],
                                           results[theirs]["rounds_tokens_per_s"])]
        print(f"  decode, best quantized: ours ({ours}) / llama.cpp ({theirs}): {rate(ours) / rate(theirs):.2f}x "
              f"(goal >= 1.3x); round by round {', '.join(f'{r:.2f}x' for r in per_round)}")
    for a, b in (("ORT fused fp32", "llama.cpp f32"), ("ORT fused int8 weights", "llama.cpp q8_0"),
                 ("ORT fused int4", "llama.cpp q4_0")):
        if b in llamas:
            print(f"  prefill of {long} tokens, {a} / {b}: "
                  f"{results[a]['ttft_long_ms'] / results[b]['ttft_long_ms']:.2f}x (goal <= 1.0x)")
    if "llama.cpp q4_0" in llamas:
        entry = manifest["graphs"]["fused-int4"]["files"]
        int4 = entry["bytes"] + entry.get("data", {}).get("bytes", 0)
        q4 = llamas["llama.cpp q4_0"][1]
        print(f"  file size: our fused int4 {int4 / 2**20:.1f} MiB / llama.cpp q4_0 {q4 / 2**20:.1f} MiB: "
              f"{int4 / q4:.2f}x (goal <= 1.1x)")
    missing = [name for name, _ in LLAMA if name not in llamas]
    if missing:
        print(f"  not measured (llama.cpp crashed on this host, see above): {', '.join(missing)}")


if __name__ == "__main__":
    run()
