"""Time to quality on 2 CPU threads: the CPU config against nanoGPT's "baby" CPU recipe, same run.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT     # once
    python bench/time_to_quality.py --nanogpt /tmp/nanoGPT

nanoGPT's README command for a CPU (4 layers x 128, block 64, batch 12, 2,000 iterations, AdamW) is
run as it is, on the same TinyShakespeare file (its prepare.py, given the file), and its validation
loss at iteration 2,000 is the bar. Then `python -m launch configs/shakespeare_char_cpu.yaml` (Muon
and AdamW, launch/optim.py) as a user runs it. Both are whole processes with 2 threads, timed by the
wall clock from start to exit; the ratio is ours / nanoGPT's, with the validation loss each reached.

Then what a run costs besides its steps (--part overhead): nanoGPT's baby CPU command for 400
iterations against `python -m launch` with the same shape, batch and AdamW recipe (lr 1e-3 to 1e-4,
100 warmup steps, evaluation every 250 steps on 20 batches, a log line every step), whole processes
timed from start to exit, interleaved over --rounds rounds; the ratio is nanoGPT's time / ours.

Then the cost of a Muon step (--part step): the same config for --step-iters steps with
train.optimizer=muon and =adamw, tokens/s from metrics.jsonl (the median of the logged intervals).

    python bench/time_to_quality.py --nanogpt /tmp/nanoGPT --part overhead --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BABY = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
        "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
        "--lr_decay_iters=2000", "--dropout=0.0"]


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def prepared_nanogpt(repo: Path, work: Path, env: dict) -> Path:
    """A copy of the nanoGPT checkout with TinyShakespeare prepared by its own prepare.py (once)."""
    from gpt.config import DataConfig
    from gpt.datasets import resolve_corpus

    tree = work / "nanoGPT"
    if not tree.exists():
        shutil.copytree(repo, tree, ignore=shutil.ignore_patterns(".git"))
        shutil.copy(resolve_corpus(DataConfig()), tree / "data" / "shakespeare_char" / "input.txt")
        timed([sys.executable, "data/shakespeare_char/prepare.py"], tree, env)
    return tree


def nanogpt(repo: Path, work: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, val loss at 2,000 iterations) of nanoGPT's baby CPU run."""
    tree = prepared_nanogpt(repo, work, env)
    wall, out = timed([sys.executable, "train.py", *BABY, f"--out_dir={work / 'nanogpt-out'}"], tree, env)
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
    return wall, float(evals[-1][2])


OVERHEAD_ITERS = 400
OURS_BABY = ["--train.optimizer=adamw", "--train.batch_size=12", "--train.learning_rate=1e-3", "--train.min_lr=1e-4",
             "--train.warmup_iters=100", "--train.beta2=0.99", "--train.eval_interval=250", "--train.eval_iters=20",
             "--train.checkpoint_interval=250", "--train.log_interval=1", f"--train.max_iters={OVERHEAD_ITERS}"]


def overhead(repo: Path, work: Path, env: dict, rounds: int) -> None:
    """nanoGPT's baby run and ours at the same shape and recipe, whole processes, interleaved."""
    tree = prepared_nanogpt(repo, work, env)
    baby = [a for a in BABY if not a.startswith(("--max_iters", "--lr_decay_iters"))]
    times: dict[str, list[float]] = {"nanoGPT": [], "ours": []}
    for r in range(rounds):
        shutil.rmtree(work / "nanogpt-out", ignore_errors=True)
        wall, out = timed([sys.executable, "train.py", *baby, f"--max_iters={OVERHEAD_ITERS}",
                           f"--lr_decay_iters={OVERHEAD_ITERS}", f"--out_dir={work / 'nanogpt-out'}"], tree, env)
        times["nanoGPT"].append(wall)
        n_loss = float(re.findall(r"iter \d+: loss ([\d.]+)", out)[-1])
        shutil.rmtree(work / "ours-overhead", ignore_errors=True)
        wall, records = ours(work, env, "ours-overhead", *OURS_BABY, config="configs/shakespeare_char_cpu.yaml")
        times["ours"].append(wall)
        o_loss = [x["train_loss"] for x in records if "train_loss" in x][-1]
        print(f"round {r + 1}: nanoGPT {times['nanoGPT'][-1]:.1f} s (last train loss {n_loss:.3f}), ours "
              f"{wall:.1f} s (last train loss {o_loss:.3f}): nanoGPT / ours {times['nanoGPT'][-1] / wall:.3f}x")
    n, o = statistics.median(times["nanoGPT"]), statistics.median(times["ours"])
    print(f"baby shape, {OVERHEAD_ITERS} iterations, AdamW against AdamW, whole processes, median of {rounds}: "
          f"nanoGPT {n:.1f} s, ours {o:.1f} s: ours is {n / o:.3f}x nanoGPT's speed")


def ours(work: Path, env: dict, name: str, *overrides: str,
         config: str = "configs/shakespeare_char_cpu.yaml") -> tuple[float, list[dict]]:
    out = work / name
    wall, _ = timed([sys.executable, "-m", "launch", config, f"--train.out_dir={out}",
                     "--train.threads=2", *overrides], ROOT, env)
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def quality(repo: Path, work: Path, env: dict, also_adamw: bool) -> None:
    n_wall, bar = nanogpt(repo, work, env)
    print(f"nanoGPT baby CPU run: {n_wall:.1f} s, val loss {bar:.4f} at iteration 2000 (the bar)")
    runs = [("muon", [])] + ([("adamw", ["--train.optimizer=adamw"])] if also_adamw else [])
    for name, extra in runs:
        wall, records = ours(work, env, name, *extra)
        evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        reached = next((s for s, v in evals if v <= bar), None)
        print(f"ours ({name}): {wall:.1f} s whole process, val loss {evals[-1][1]:.4f} at step {evals[-1][0]}"
              f"{'' if reached is None else f' (at or under the bar from step {reached})'}; "
              f"time / nanoGPT's: {wall / n_wall:.2f}x{'' if evals[-1][1] <= bar else ' (bar NOT reached)'}")


def step_cost(work: Path, env: dict, iters: int, rounds: int) -> None:
    """Tokens/s of the CPU config with each optimizer, interleaved over rounds; the median of each."""
    rates: dict[str, list[float]] = {"adamw": [], "muon": []}
    for r in range(rounds):
        for name in rates:
            shutil.rmtree(work / f"step-{name}", ignore_errors=True)
            _, records = ours(work, env, f"step-{name}", f"--train.optimizer={name}", f"--train.max_iters={iters}",
                              f"--train.eval_interval={iters}", f"--train.checkpoint_interval={iters}",
                              "--train.log_interval=20")
            rates[name].append(statistics.median(x["tokens_per_s"] for x in records if "tokens_per_s" in x))
    adamw, muon = statistics.median(rates["adamw"]), statistics.median(rates["muon"])
    print(f"step cost, the CPU config, {iters} steps each, median of {rounds}: AdamW {adamw:.0f} tokens/s, Muon "
          f"{muon:.0f} tokens/s: a Muon step costs {adamw / muon:.2f}x an AdamW step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (for quality and overhead)")
    parser.add_argument("--part", choices=["quality", "overhead", "step", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead and step parts")
    parser.add_argument("--step-iters", type=int, default=200, help="steps of each optimizer-cost run")
    parser.add_argument("--also-adamw", action="store_true", help="also the CPU config with train.optimizer=adamw")
    args = parser.parse_args()
    if args.part in ("quality", "overhead", "all") and args.nanogpt is None:
        parser.error(f"--part {args.part} runs nanoGPT: pass --nanogpt, a checkout of karpathy/nanoGPT")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-ttq-"))
    try:
        if args.part in ("quality", "all"):
            quality(args.nanogpt, work, env, args.also_adamw)
        if args.part in ("overhead", "all"):
            overhead(args.nanogpt, work, env, args.rounds)
        if args.part in ("step", "all"):
            step_cost(work, env, args.step_iters, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
