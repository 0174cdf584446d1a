"""Export at GPT-2 sizes: wall time and peak memory of `python -m export`, next to optimum-cli.

    python bench/export.py                       # GPT-2-small shape: 12 x 768, block 1024, vocab 50,257
    python bench/export.py --shape large         # 36 x 1280 (774M parameters, 2.9 GiB: past protobuf's 2 GB)
    python bench/export.py --shape smollm2-135m  # the Llama family: 30 x 576, 9 heads, 3 key/value heads
    python bench/export.py --optimum-cli /path/to/venv/bin/optimum-cli
    python bench/export.py --shape smollm2-135m --from-transformers   # the fine-tuning path, one script

A checkpoint of that shape with seeded random weights (and a byte-level BPE of exactly the vocabulary's
size, learned from TinyShakespeare) is made first, outside the timings. Then, each in its own process,
timed by wall clock and measured by its peak resident memory (getrusage of the child: the largest
of its processes; the export runs in one, unless a trace is asked for past 64 MiB of weights):

    ours      python -m export CKPT DIR --optimize --int4   (every gate: the parity grids, 200 greedy
              tokens per fp32 graph, the validation-loss change of each variant)
    hf        python -m export CKPT DIR --format hf         (the same weights as a transformers folder)
    optimum   optimum-cli export onnx --model HF DIR --task text-generation-with-past
              (Optimum's own export and its validation; optimum-onnx pins an older transformers, so it
              is best installed in a venv of its own: pip install torch==2.13.0 'optimum-onnx[onnxruntime]')
    load      the fused int4 graph opened by serve.runtime.OnnxModel, then 64 greedy tokens: load time,
              resident memory after loading and peak

With --from-transformers the weights start as a user's would: a transformers folder of that shape
(LlamaConfig or GPT2Config, save_pretrained, with the same BPE's tokenizer.json), made outside the timings.
Then, timed step by step: `python -m launch` with model.init_from=hf:FOLDER (the import, its parity
check against transformers, tokenizing TinyShakespeare) and one training step of one window of the
block's length; the export above of that run's checkpoint; `python -m serve --greedy`, 64 tokens from
the fused int4 graph.

It prints the machine, the ratios of the same run, and the files each graph is written as.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_bpe, machine, random_checkpoint  # noqa: E402

SHAPES = {"seed": (8, 8, 512, 256), "small": (12, 12, 768, 1024), "medium": (24, 16, 1024, 1024),
          "large": (36, 20, 1280, 1024), "smollm2-135m": (30, 9, 576, 1024)}
# the Llama family's shapes (SmolLM2-135M: 3 key/value heads, SwiGLU 1,536 wide, rope_theta 100,000, tied,
# vocab 49,152; its context of 8,192 cut to 1,024 here, as a fine-tune on a CPU would train it)
FAMILY = {"smollm2-135m": {"arch": "llama", "num_kv_heads": 3, "intermediate_size": 1536, "rope_theta": 100000.0}}
VOCAB = {"smollm2-135m": 49152}
ROOT = Path(__file__).resolve().parent.parent


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run a command; (wall seconds, peak RSS bytes of its children, its output's last lines). The peak
    is RUSAGE_CHILDREN's, so call it in a process that has run no other child (run_measured does)."""
    import resource

    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, peak, "\n".join(proc.stdout.strip().splitlines()[-12:])


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """`measured` in a fresh helper process, so RUSAGE_CHILDREN's peak is this command's alone."""
    helper = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.export import measured; "
              "print(json.dumps(measured(json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", helper, str(ROOT), json.dumps(cmd)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    wall, peak, tail = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, peak, tail


LOAD = """
import json, sys, time
from serve.generate import generate
from serve.runtime import OnnxModel, resident_bytes
from gpt.sampling import SamplingParams
model = OnnxModel(sys.argv[1], variant=sys.argv[2], threads=int(sys.argv[3]))
loaded = resident_bytes()
start = time.perf_counter()
events = list(generate(model, "The ", 64, SamplingParams(greedy=True)))
rate = 63 / (time.perf_counter() - start)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would start at the bench's own size
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": model.load_seconds, "resident": loaded, "rate": rate, "peak": peak}))
"""


def transformers_folder(folder: Path, shape: str, vocab: int, family: dict):
    """A transformers folder of the shape, as save_pretrained writes it, with seeded random weights (their
    own initialisation) and the bench's BPE as tokenizer.json. Returns its number of parameters."""
    import torch
    import transformers

    layers, heads, dim, block = SHAPES[shape]
    tokenizer = bench_bpe(vocab)
    if family.get("arch") == "llama":  # SmolLM2-135M's config.json, but for the context a CPU fine-tune uses
        config = transformers.LlamaConfig(
            hidden_size=dim, intermediate_size=family["intermediate_size"], num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=family["num_kv_heads"], max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=family["rope_theta"], vocab_size=vocab, tie_word_embeddings=True,
            bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
        model_class = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=dim, n_positions=block,
                                         vocab_size=vocab, bos_token_id=tokenizer.eot_id,
                                         eos_token_id=tokenizer.eot_id)
        model_class = transformers.GPT2LMHeadModel
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(str(folder))
    tokenizer.save(folder / "tokenizer.json")
    return sum(p.numel() for p in model.parameters())


def fine_tune_one_step(folder: Path, out: Path, block: int, threads: int, env: dict) -> float:
    """init_from=hf:FOLDER, one step of one window, a checkpoint: the wall time of the whole command."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "configs/finetune_gpt2_shakespeare.yaml", f"--model.init_from=hf:{folder}",
         f"--model.block_size={block}", "--train.max_iters=1", "--train.batch_size=1",
         "--train.gradient_accumulation_steps=1", "--train.mixed_precision=no", "--train.device=cpu",
         f"--train.threads={threads}", "--train.eval_interval=1", "--train.eval_iters=1",
         "--train.checkpoint_interval=1", f"--train.out_dir={out}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"init_from and one step failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return time.perf_counter() - started


def files_of(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = []
    for variant, name in manifest["files"].items():
        entry = manifest["graphs"][variant]["files"]
        size = entry["bytes"] + entry.get("data", {}).get("bytes", 0)
        parts.append(f"{variant}: {name}{' + .data' if 'data' in entry else ''} ({size / 2**20:.0f} MiB)")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--vocab", type=int, default=None, help="default: GPT-2's 50,257 (SmolLM2's 49,152)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--optimum-cli", default=shutil.which("optimum-cli"),
                        help="optimum-cli to compare with (default: the one on PATH; none: skipped)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--from-transformers", action="store_true",
                        help="start from a transformers folder: init_from, one training step, the export, generate")
    args = parser.parse_args()
    layers, heads, dim, block = SHAPES[args.shape]
    args.vocab = args.vocab or VOCAB.get(args.shape, 50257)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-export-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    print(machine())
    if args.from_transformers:
        family = FAMILY.get(args.shape, {})
        params = transformers_folder(work / "transformers", args.shape, args.vocab, family)
        arch, kv_heads = family.get("arch", "gpt2"), family.get("num_kv_heads", heads)
        mlp = family.get("intermediate_size", 4 * dim)
    else:
        ckpt, model, _ = random_checkpoint(work / "checkpoint", layers, heads, dim, block, vocab=args.vocab,
                                           **FAMILY.get(args.shape, {}))
        params = sum(p.numel() for p in model.parameters())
        arch, kv_heads, mlp = model.config.arch, model.config.kv_heads, model.config.mlp_dim
        del model
    weights = params * 4
    print(f"{args.shape} shape ({arch}, {kv_heads} key/value heads, MLP {mlp}): {layers} layers x {dim} "
          f"wide, {heads} heads, block {block}, vocab {args.vocab}: "
          f"{params / 1e6:.0f}M parameters, {weights / 2**30:.2f} GiB in fp32; {args.threads} threads")
    steps = {}
    if args.from_transformers:
        ckpt = work / "run"
        steps["init_from + 1 step"] = fine_tune_one_step(work / "transformers", ckpt, block, args.threads, env)
        print(f"init    launch --model.init_from=hf:FOLDER, one step of {block} tokens: "
              f"{steps['init_from + 1 step']:6.1f} s")
    try:
        ours = run_measured([sys.executable, "-m", "export", str(ckpt), str(work / "onnx"), "--optimize", "--int4",
                             "--force", "--threads", str(args.threads)], env)
        manifest = json.loads((work / "onnx" / "manifest.json").read_text())
        timings = manifest.get("timings", {})
        verification = sum(v for k, v in timings.items() if k.startswith("verify"))
        print(f"ours    export --optimize --int4: {ours[0]:6.1f} s, peak RSS {ours[1] / 2**30:.2f} GiB "
              f"({ours[1] / weights:.2f}x the fp32 weights); of which verification {verification:.1f} s")
        print(f"        steps: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")
        print(f"        files: {files_of(work / 'onnx')}")
        if args.from_transformers:
            steps["export"] = ours[0]
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "serve", str(work / "onnx"), "--prompt", "ROMEO:", "--greedy",
                                  "--max-new-tokens", "64", "--model", "fused-int4", "--threads", str(args.threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            steps["generate"] = time.perf_counter() - started
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            print(f"serve   python -m serve --greedy, 64 tokens (fused int4): {steps['generate']:6.1f} s "
                  f"({out.stderr.strip().splitlines()[-1]})")
            print(f"path    transformers folder -> serve: {sum(steps.values()):6.1f} s in all "
                  f"({', '.join(f'{k} {v:.1f} s' for k, v in steps.items())}); the export {ours[0]:.1f} s "
                  f"at {ours[1] / weights:.2f}x the weights' size (goals: <= 100 s, <= 3x)")
        hf = run_measured([sys.executable, "-m", "export", str(ckpt), str(work / "hf"), "--format", "hf", "--force"],
                          env)
        print(f"hf      export --format hf: {hf[0]:6.1f} s, peak RSS {hf[1] / 2**30:.2f} GiB")
        if args.optimum_cli:
            opt = run_measured([args.optimum_cli, "export", "onnx", "--model", str(work / "hf"), "--task",
                                "text-generation-with-past", str(work / "optimum")], env)
            print(f"optimum optimum-cli export onnx: {opt[0]:6.1f} s, peak RSS {opt[1] / 2**30:.2f} GiB "
                  f"({opt[1] / weights:.2f}x)")
            print(f"ratio   ours / optimum-cli: time {ours[0] / opt[0]:.2f}x (ours with --optimize --int4 and every "
                  f"gate), peak RSS {ours[1] / opt[1]:.2f}x")
            print(f"ratio   ours / (optimum-cli + our verification, {opt[0] + verification:.1f} s): time "
                  f"{ours[0] / (opt[0] + verification):.2f}x")
        else:
            print("optimum not measured: no optimum-cli (pass --optimum-cli PATH)")
        for variant in ("fused-int4", "fp32"):
            out = subprocess.run([sys.executable, "-c", LOAD, str(work / "onnx"), variant, str(args.threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"load    {variant}: {r['load_s']:.2f} s, resident {r['resident'] / 2**30:.2f} GiB after loading, "
                  f"peak {r['peak'] / 2**30:.2f} GiB while generating; greedy decode {r['rate']:.1f} tokens/s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
