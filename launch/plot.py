"""Loss curves of a run: train and validation loss against step, from its metrics.jsonl.

    python -m launch.plot RUN_DIR [--out FILE]     (default RUN_DIR/loss.png; FILE.svg: an SVG)

plot_losses() draws a PNG with matplotlib (`.[teach]`). loss_svg() writes the same curves as an SVG
with no plotting library, in milliseconds: training writes RUN_DIR/loss.svg at the end of every
run (a browser, an editor or Jupyter shows it), so a run pays nothing for its picture.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
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


def losses(run_dir: str | Path) -> tuple[list, list, list]:
    """(train, evals, bpb): (step, train loss) per log line, (step, eval train loss, val loss) per
    evaluation, and the evaluations' val bits per byte (None for a run without them)."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no losses yet: plot after the first log interval")
    return train, evals, [r.get("val_bpb") for r in records if "val_loss" in r]


def plot_losses(run_dir: str | Path, out: str | Path | None = None,
                references: dict[str, float] | None = None) -> Path:
    """Train and validation loss against step; `references` draws labelled horizontal lines (say
    {"ln V: uniform guess": 4.17, "bigram": 2.49}) to read the curve against."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and a second less at the end of a run

    train, evals, bpb = losses(run_dir)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, linewidth=1, label="train loss (each log interval)")
    if evals:
        steps, train_eval, val = zip(*evals)
        ax.plot(steps, train_eval, "o-", color="tab:blue", label="train loss (evaluation)")
        ax.plot(steps, val, "o-", color="tab:orange", label="validation loss")
        best = min(range(len(val)), key=val.__getitem__)
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


def ticks(low: float, high: float, log: bool) -> list[float]:
    """About five round values (1, 2 or 5 times a power of ten) from low to high; on a log axis the
    1-2-5 values of each decade."""
    if log:
        values = [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                  for m in (1, 2, 5)]
        return [v for v in values if low <= v <= high] or [low, high]
    raw = (high - low) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def loss_svg(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """plot_losses()'s curves (train per log line, train and validation per evaluation, the best
    validation loss labelled) as an 800x500 SVG written by hand: no plotting library, a few ms."""
    train, evals, bpb = losses(run_dir)
    values = [v for _, v in train] + [v for e in evals for v in e[1:]]
    steps = [s for s, _ in train] + [e[0] for e in evals]
    log = max(values) / max(min(values), 1e-9) > 3
    f = (lambda v: math.log(max(v, 1e-9))) if log else float  # loss to the axis' scale
    y_low, y_high = f(min(values)), f(max(values))
    pad = (y_high - y_low) * 0.05 or 0.05
    y_low, y_high, x_high = y_low - pad, y_high + pad, max(max(steps), 1)
    floor, ceiling = (math.exp(y_low), math.exp(y_high)) if log else (y_low, y_high)  # the axis' ends, as losses
    left, top, width, height = 70, 40, 700, 400  # the plot area inside an 800 x 500 picture

    def x_of(step: float) -> float:
        return left + width * step / x_high

    def y_of(value: float) -> float:
        return top + height * (y_high - f(value)) / (y_high - y_low)

    def line(points: list, color: str, extra: str = "") -> str:
        return (f'<polyline fill="none" stroke="{color}" {extra} '
                f'points="{" ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in points)}"/>') if points else ""

    parts = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#888"/>']
    for v in ticks(floor, ceiling, log):
        y = f"{y_of(v):.1f}"
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle">{v:g}</text>')
    for s in ticks(0, x_high, False):
        parts.append(f'<line x1="{x_of(s):.1f}" x2="{x_of(s):.1f}" y1="{top}" y2="{top + height}" stroke="#ddd"/>'
                     f'<text x="{x_of(s):.1f}" y="{top + height + 18}" text-anchor="middle">{s:g}</text>')
    parts.append(line(train, "#1f77b4", 'stroke-opacity="0.35"'))
    if evals:
        for points, color in (([(s, t) for s, t, _ in evals], "#1f77b4"), ([(s, v) for s, _, v in evals], "#ff7f0e")):
            parts.append(line(points, color, 'stroke-width="2"'))
            parts += [f'<circle cx="{x_of(s):.1f}" cy="{y_of(v):.1f}" r="3.5" fill="{color}"/>' for s, v in points]
        best = min(range(len(evals)), key=lambda i: evals[i][2])
        s, _, v = evals[best]
        note = f" ({bpb[best]:.3f} bits/byte)" if bpb[best] is not None else ""
        parts.append(f'<text x="{x_of(s):.1f}" y="{y_of(v) - 10:.1f}" text-anchor="end" fill="#ff7f0e" '
                     f'stroke="white" stroke-width="3" paint-order="stroke">val {v:.3f}{note} @ {s}</text>')
    for i, (label, color, opacity) in enumerate((("train loss (each log line)", "#1f77b4", 0.35),
                                                 ("train loss (evaluation)", "#1f77b4", 1),
                                                 ("validation loss", "#ff7f0e", 1))):
        y = top + 20 + 18 * i
        parts.append(f'<line x1="{left + width - 210}" x2="{left + width - 185}" y1="{y}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2" stroke-opacity="{opacity}"/><text x="{left + width - 178}" y="{y}" '
                     f'dominant-baseline="middle">{label}</text>')
    title = escape(f"{Path(run_dir).resolve().name}: loss against step")
    ylabel = "cross-entropy loss (nats per token)" + (", log scale" if log else "")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="800" height="500" viewBox="0 0 800 500" '
           f'font-family="sans-serif" font-size="12"><rect width="800" height="500" fill="white"/>'
           f'<text x="400" y="24" text-anchor="middle" font-size="15">{title}</text>{"".join(parts)}'
           f'<text x="{left + width / 2}" y="{top + height + 40}" text-anchor="middle">step</text>'
           f'<text transform="translate(18,{top + height / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>'
           '</svg>\n')
    out = Path(out) if out else Path(run_dir) / "loss.svg"
    out.write_text(svg)
    return out


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot",
                                     description="Draw a run's train and validation loss against step.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/loss.png); a name ending in "
                        ".svg writes an SVG, without matplotlib")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from gpt.cli import run_command

    def work() -> None:
        try:
            svg = args.out is not None and args.out.endswith(".svg")
            print(f"wrote {(loss_svg if svg else plot_losses)(args.run_dir, args.out)}")
        except ImportError:
            raise ValueError("plotting needs matplotlib: pip install -e '.[teach]'") from None

    return run_command(work, (FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
