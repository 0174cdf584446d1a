"""The Llama family against the tutorial's GPT-2, same budget, same run: validation loss against wall time.

    python bench/arch.py                       # the two CPU configs, 2 threads
    python bench/arch.py --configs configs/shakespeare_char_cpu.yaml configs/shakespeare_llama_cpu.yaml

Each config is trained by `python -m launch` as a user runs it, a whole process with the same threads,
evaluating every --eval-interval steps (the same for both, so both pay the same for it). The first
config is the bar: its final validation loss, and its whole process's wall time. For each other config
the script prints its curve, the step and the time (from the process's start, read off metrics.jsonl)
at which its validation loss first reached the bar, and that time over the bar's.
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

from bench.common import machine  # noqa: E402


def train(config: str, out: Path, threads: int, eval_interval: int) -> tuple[float, list[dict], int]:
    """(wall seconds, [{step, val_loss, seconds}], parameters) of one whole training process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "launch", config, f"--train.out_dir={out}",
                           f"--train.threads={threads}", f"--train.eval_interval={eval_interval}",
                           f"--train.checkpoint_interval={10 ** 6}"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "val_loss": r["val_loss"], "seconds": r["time"] - started}
             for r in rows if "val_loss" in r]
    report = json.loads((out / "run.json").read_text())
    return wall, curve, report.get("model_parameters", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/shakespeare_char_cpu.yaml",
                                                         "configs/shakespeare_llama_cpu.yaml"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-interval", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.threads} threads")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(args.configs):
            results[config] = train(config, Path(tmp) / f"run{i}", args.threads, args.eval_interval)
    bar_config = args.configs[0]
    bar_wall, bar_curve, _ = results[bar_config]
    bar = bar_curve[-1]["val_loss"]
    for config, (wall, curve, params) in results.items():
        print(f"{config}: {params / 1e6:.3f}M parameters, {wall:.1f} s whole process, final val "
              f"{curve[-1]['val_loss']:.4f}")
        print("  curve (step: val loss @ s): " + ", ".join(f"{c['step']}: {c['val_loss']:.4f} @ {c['seconds']:.1f}"
                                                           for c in curve))
        if config == bar_config:
            continue
        reached = next((c for c in curve if c["val_loss"] <= bar), None)
        if reached is None:
            print(f"  never reached the bar ({bar_config}'s final val {bar:.4f})")
            continue
        print(f"  reached {bar_config}'s final val {bar:.4f} at step {reached['step']}, {reached['seconds']:.1f} s: "
              f"{reached['seconds'] / bar_wall:.2f}x its {bar_wall:.1f} s (goal <= 0.85x)")
    print(json.dumps({c: {"wall_s": w, "curve": cv} for c, (w, cv, _) in results.items()}))


if __name__ == "__main__":
    main()
