"""Loss curves of a run: train and validation loss against step, from its metrics.jsonl.

    python -m launch.plot RUN_DIR [--out FILE]     (default RUN_DIR/loss.png)

Training draws it into the run folder at the end when matplotlib is installed (`.[teach]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass a run's out_dir (it holds metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a kill mid-write
            continue
    return records


def plot_losses(run_dir: str | Path, out: str | Path | None = None,
                references: dict[str, float] | None = None) -> Path:
    """Train and validation loss against step; `references` draws labelled horizontal lines (say
    {"ln V: uniform guess": 4.17, "bigram": 2.49}) to read the curve against."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and a second less at the end of a run

    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no losses yet: plot after the first log interval")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, linewidth=1, label="train loss (each log interval)")
    if evals:
        steps, train_eval, val = zip(*evals)
        ax.plot(steps, train_eval, "o-", color="tab:blue", label="train loss (evaluation)")
        ax.plot(steps, val, "o-", color="tab:orange", label="validation loss")
        best = min(range(len(val)), key=val.__getitem__)
        bpb = [r.get("val_bpb") for r in records if "val_loss" in r]
        note = f" ({bpb[best]:.3f} bits/byte)" if bpb[best] is not None else ""
        ax.annotate(f"val {val[best]:.3f}{note} @ {steps[best]}", (steps[best], val[best]),
                    textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=9, color="tab:orange")
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1)
        ax.annotate(f"{label} ({value:.2f})", (0.01, value), xycoords=("axes fraction", "data"), ha="left",
                    va="bottom", fontsize=8, color="dimgrey")
    values = [v for _, v in train] + [v for e in evals for v in e[1:]] + list((references or {}).values())
    log_axis = max(values) / max(min(values), 1e-9) > 3  # a wide range reads better on a log axis
    if log_axis:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per token)" + (", log scale" if log_axis else ""))
    ax.set_title(f"{Path(run_dir).resolve().name}: loss against step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    return out


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot",
                                     description="Draw a run's train and validation loss against step.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/loss.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from gpt.cli import run_command

    def work() -> None:
        try:
            print(f"wrote {plot_losses(args.run_dir, args.out)}")
        except ImportError:
            raise ValueError("plotting needs matplotlib: pip install -e '.[teach]'") from None

    return run_command(work, (FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
