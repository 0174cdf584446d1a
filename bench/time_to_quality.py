"""Time to quality on 2 CPU threads: the CPU config against nanoGPT's "baby" CPU recipe, same run.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT     # once
    python bench/time_to_quality.py --nanogpt /tmp/nanoGPT

nanoGPT's README command for a CPU (4 layers x 128, block 64, batch 12, 2,000 iterations, AdamW) is
run as it is, on the same TinyShakespeare file (its prepare.py, given the file), and its validation
loss at iteration 2,000 is the bar. Then `python -m launch configs/shakespeare_char_cpu.yaml` (Muon
and AdamW, launch/optim.py) as a user runs it. Both are whole processes with 2 threads, timed by the
wall clock from start to exit; the ratio is ours / nanoGPT's, with the validation loss each reached.

Then the cost of a Muon step: the same config for --step-iters steps with train.optimizer=muon and
=adamw, tokens/s from metrics.jsonl (the median of the logged intervals).
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


def nanogpt(repo: Path, work: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, val loss at 2,000 iterations) of nanoGPT's baby CPU run."""
    from gpt.config import DataConfig
    from gpt.datasets import resolve_corpus

    tree = work / "nanoGPT"
    shutil.copytree(repo, tree, ignore=shutil.ignore_patterns(".git"))
    shutil.copy(resolve_corpus(DataConfig()), tree / "data" / "shakespeare_char" / "input.txt")
    timed([sys.executable, "data/shakespeare_char/prepare.py"], tree, env)
    wall, out = timed([sys.executable, "train.py", *BABY, f"--out_dir={work / 'nanogpt-out'}"], tree, env)
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
    return wall, float(evals[-1][2])


def ours(work: Path, env: dict, name: str, *overrides: str) -> tuple[float, list[dict]]:
    out = work / name
    wall, _ = timed([sys.executable, "-m", "launch", "configs/shakespeare_char_cpu.yaml", f"--train.out_dir={out}",
                     "--train.threads=2", *overrides], ROOT, env)
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--step-iters", type=int, default=200, help="steps of each optimizer-cost run")
    parser.add_argument("--also-adamw", action="store_true", help="also the CPU config with train.optimizer=adamw")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-ttq-"))
    try:
        n_wall, bar = nanogpt(args.nanogpt, work, env)
        print(f"nanoGPT baby CPU run: {n_wall:.1f} s, val loss {bar:.4f} at iteration 2000 (the bar)")
        runs = [("muon", [])] + ([("adamw", ["--train.optimizer=adamw"])] if args.also_adamw else [])
        for name, extra in runs:
            wall, records = ours(work, env, name, *extra)
            evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            reached = next((s for s, v in evals if v <= bar), None)
            print(f"ours ({name}): {wall:.1f} s whole process, val loss {evals[-1][1]:.4f} at step {evals[-1][0]}"
                  f"{'' if reached is None else f' (at or under the bar from step {reached})'}; "
                  f"time / nanoGPT's: {wall / n_wall:.2f}x{'' if evals[-1][1] <= bar else ' (bar NOT reached)'}")
        rates = {}
        for name in ("adamw", "muon"):
            _, records = ours(work, env, f"step-{name}", f"--train.optimizer={name}",
                              f"--train.max_iters={args.step_iters}", f"--train.eval_interval={args.step_iters}",
                              f"--train.checkpoint_interval={args.step_iters}", "--train.log_interval=20")
            rates[name] = statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
        print(f"step cost, {args.step_iters} steps each: AdamW {rates['adamw']:.0f} tokens/s, Muon "
              f"{rates['muon']:.0f} tokens/s: a Muon step costs {rates['adamw'] / rates['muon']:.2f}x an AdamW step")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
