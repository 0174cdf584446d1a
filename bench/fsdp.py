"""FSDP2 against DDP on CPU processes: memory per rank at the GPT-2-large shape, and tokens/s at the
CPU config's shape, in the same run, printed as a table of ratios.

    python bench/fsdp.py                 # both parts (about 10 minutes on 2 cores, 17 GiB of memory)
    python bench/fsdp.py --part memory   # or --part speed

memory: one training step (AdamW, fp32) of GPT-2-large's shape (36 layers, 1280 wide, 20 heads, vocab
  50,257; 774M parameters) on a few random tokens, in processes started by torchrun:
  - FSDP2 over 2 ranks, through launch.sharding.shard() and the trainer's optimizers, then a sharded
    save of the weights and AdamW's state (launch.checkpointing.save_sharded_state) and a load of it;
  - DDP's replica on 1 rank (torch's DistributedDataParallel: a rank holds the same whatever the
    number of ranks, so one rank measures it, where two would not fit in this machine's memory).
  Each rank reports its peak resident set (ru_maxrss), after the step and after save and load.
speed: the trainer itself (python -m launch, configs/shakespeare_char_cpu.yaml's shape, with its Muon
  recipe and with AdamW) under configs/accelerate/fsdp.yaml and cpu_ddp.yaml, 2 processes of 1
  thread, rounds interleaved; the median steady tokens/s of each (the first log interval left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LARGE = {"num_layers": 36, "embedding_dim": 1280, "num_heads": 20, "block_size": 1024, "vocab_size": 50257,
         "tie_embeddings": True, "dropout": 0.0}


def worker(mode: str, out: Path, tokens: int) -> None:
    """One rank of the memory part (run under torchrun)."""
    import resource
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from gpt.config import ModelConfig, RunConfig
    from gpt.model import GPT
    from launch.checkpointing import load_sharded_state, save_sharded_state
    from launch.optim import make_optimizers

    def peak_gib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = RunConfig()
    config.model = ModelConfig(**LARGE)
    config.train.parallelism = mode
    model = GPT(config.model)
    report = {"mode": mode, "rank": rank, "world_size": dist.get_world_size(),
              "parameters": model.num_parameters(exclude_positions=False), "after_build_gib": peak_gib()}
    if mode == "fsdp":
        from launch.sharding import shard, sharding_report

        model = shard(model, config, torch.device("cpu"))
        report["parameters_here"] = sharding_report(model)["parameters_here"]
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = make_optimizers(model.module if mode == "ddp" else model, config.train, torch.device("cpu"))
    x = torch.randint(0, LARGE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(rank))
    t0 = time.perf_counter()
    model(x, x).loss.backward()
    for o in optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
    report["step_s"] = time.perf_counter() - t0
    report["after_step_gib"] = peak_gib()
    if mode == "fsdp":
        folder = out / "checkpoint"
        t0 = time.perf_counter()
        save_sharded_state(SimpleNamespace(device=torch.device("cpu"), process_index=rank), model, optimizers, folder)
        dist.barrier()
        report["save_s"] = time.perf_counter() - t0
        report["after_save_gib"] = peak_gib()
        t0 = time.perf_counter()
        (folder / "meta.json").write_text(json.dumps({"format": "gpt-checkpoint", "version": 1}))
        load_sharded_state(SimpleNamespace(device=torch.device("cpu"), process_index=rank, num_processes=2),
                           model, optimizers, folder)
        report["load_s"] = time.perf_counter() - t0
        report["after_load_gib"] = peak_gib()
        report["checkpoint_gib"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def torchrun(mode: str, ranks: int, out: Path, tokens: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           __file__, "--worker", mode, "--out", str(out), "--tokens", str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def memory(tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fsdp = torchrun("fsdp", 2, Path(tmp), tokens)
        ddp = torchrun("ddp", 1, Path(tmp), tokens)[0]
    n = ddp["parameters"]
    whole = n * 16 / 2**30  # fp32 weights, gradients and AdamW's two moments
    print(f"\nGPT-2-large shape, {n / 1e6:.0f}M parameters (whole state with AdamW: {whole:.1f} GiB), one step on "
          f"{tokens} tokens, fp32, 1 thread per rank")
    print(f"{'':34} {'DDP (1 rank)':>13} {'FSDP rank 0':>12} {'FSDP rank 1':>12} {'FSDP/DDP':>9}")
    rows = [("parameters held", "parameters", 1e6, "M"), ("peak RSS after build, GiB", "after_build_gib", 1, ""),
            ("peak RSS after the step, GiB", "after_step_gib", 1, ""), ("step seconds", "step_s", 1, "")]
    for label, key, scale, unit in rows:
        d = ddp[key] / scale
        f = [r.get("parameters_here" if key == "parameters" else key, 0) / scale for r in fsdp]
        print(f"{label:34} {d:>12.2f}{unit} {f[0]:>11.2f}{unit} {f[1]:>11.2f}{unit} {max(f) / d:>8.2f}x")
    for key, label in (("after_save_gib", "peak RSS through save, GiB"),
                       ("after_load_gib", "peak RSS through load, GiB")):
        most = max(r[key] for r in fsdp)
        print(f"{label:34} {'':>13} {fsdp[0][key]:>11.2f} {fsdp[1][key]:>12.2f} {most / whole:>7.2f}x "
              "of the whole state")
    print(f"sharded checkpoint: {fsdp[0]['checkpoint_gib']:.2f} GiB on disk, saved in {fsdp[0]['save_s']:.1f} s, "
          f"loaded in {fsdp[0]['load_s']:.1f} s")
    ratio = max(r["after_step_gib"] for r in fsdp) / ddp["after_step_gib"]
    print(f"goal: FSDP peak per rank <= 0.6x DDP's: {ratio:.2f}x ({'met' if ratio <= 0.6 else 'NOT met'}); "
          f"no rank held the whole state while saving and loading: "
          f"{'yes' if max(r['after_load_gib'] for r in fsdp) < whole else 'NO'}")


def steady_tokens_per_s(out_dir: Path) -> float:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(speeds[1:])


MODES = {  # accelerate launch's flags for each way of sharing the work
    "DDP": ["--config_file", "configs/accelerate/cpu_ddp.yaml"],
    "FSDP (configs/accelerate/fsdp.yaml)": ["--config_file", "configs/accelerate/fsdp.yaml"],
    "FSDP, fsdp_reshard_after_forward false": ["--config_file", "configs/accelerate/fsdp.yaml",
                                               "--fsdp_reshard_after_forward", "false"],
}


def speed(rounds: int, iters: int) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    run = ["-m", "launch", "configs/shakespeare_char_cpu.yaml", f"--train.max_iters={iters}",
           f"--train.eval_interval={iters}", "--train.eval_iters=1", f"--train.checkpoint_interval={iters}",
           "--train.log_interval=10", "--train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for optimizer in ("muon", "adamw"):
                for i, (mode, flags) in enumerate(MODES.items()):
                    out = Path(tmp) / f"{optimizer}-{i}-{r}"
                    proc = subprocess.run([*launch, *flags, *run, f"--train.optimizer={optimizer}",
                                           f"--train.out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                    results.setdefault((optimizer, mode), []).append(steady_tokens_per_s(out))
    print(f"\nconfigs/shakespeare_char_cpu.yaml's shape, 2 processes x 1 thread, {iters} steps, {rounds} rounds "
          "interleaved; tokens/s")
    for optimizer in ("muon", "adamw"):
        ddp = statistics.median(results[(optimizer, "DDP")])
        for mode in MODES:
            got = statistics.median(results[(optimizer, mode)])
            runs = ", ".join(f"{v:,.0f}" for v in results[(optimizer, mode)])
            met = "met" if got / ddp >= 0.8 else "NOT met"
            verdict = "" if mode == "DDP" else f"  {got / ddp:.2f}x DDP (goal >= 0.8x: {met})"
            print(f"{optimizer:6} {mode:42} {got:>8,.0f}{verdict}   [{runs}]")
    print("the price of sharding a model that fits on one rank: every block's weights gathered in forward and "
          "backward, its gradients reduce-scattered, one collective at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("memory", "speed", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=64, help="memory: tokens in the one step's batch")
    parser.add_argument("--rounds", type=int, default=2, help="speed: interleaved rounds of each")
    parser.add_argument("--iters", type=int, default=60, help="speed: training steps per run")
    parser.add_argument("--worker", choices=("fsdp", "ddp"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.out, args.tokens)
    from bench.common import machine

    print(machine())
    if args.part in ("memory", "both"):
        memory(args.tokens)
    if args.part in ("speed", "both"):
        speed(args.rounds, args.iters)


if __name__ == "__main__":
    main()
