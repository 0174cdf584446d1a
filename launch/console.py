"""What the main process shows while training: a rich live panel on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class TrainingConsole:
    """Progress bar with step/max, train loss, last val loss, lr, tokens/s, MFU and ETA.

    Only the main process should make one (`enabled=False` elsewhere makes every call a no-op).
    When stdout is not a terminal (CI, a log file), it prints one plain line per log interval.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, live: bool | None = None):
        self.enabled = enabled
        self.total = total
        self.live = sys.stdout.isatty() if live is None else live
        self.console = Console(highlight=False)
        self.val_loss: float | None = None
        self.progress: Progress | None = None
        self.started = time.time()
        if enabled and self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss [cyan]{task.fields[loss]}"),
                TextColumn("val [magenta]{task.fields[val]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("MFU {task.fields[mfu]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self.task = self.progress.add_task(
                "train", total=total, completed=initial, loss="-", val="-", lr="-", tps="-", mfu="-"
            )
            self.progress.start()

    def log(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        if self.enabled:
            self.console.print(message) if self.live else print(message, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(
                self.task, completed=step, loss=f"{loss:.4f}", val=_fmt(self.val_loss, ".4f"), lr=f"{lr:.2e}",
                tps=f"{tokens_per_s:,.0f}", mfu="-" if mfu is None else f"{mfu:.1%}",
            )
        else:
            mfu_text = "" if mfu is None else f" mfu {mfu:.1%}"
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s{mfu_text} "
                  f"elapsed {time.time() - self.started:.1f}s", flush=True)

    def evaluation(self, step: int, train_loss: float, val_loss: float, val_bpb: float | None = None) -> None:
        self.val_loss = val_loss
        bpb = "" if val_bpb is None else f" ({val_bpb:.4f} bits per byte)"
        self.log(f"eval step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} nats per token{bpb}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
