"""What the main process shows while training: a rich live panel on a terminal, plain lines elsewhere;
what the run is (log_start) and what chat fine-tuning learns from (chat_summary)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launch.flops import peak_flops

if TYPE_CHECKING:
    from gpt.config import RunConfig
    from gpt.data import TokenizedCorpus


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
                TextColumn("mem {task.fields[mem]} GiB"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self.task = self.progress.add_task(
                "train", total=total, completed=initial, loss="-", val="-", lr="-", tps="-", mfu="-", mem="-"
            )
            self.progress.start()

    def log(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        if self.enabled:
            self.console.print(message) if self.live else print(message, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
             memory_gib: float | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(
                self.task, completed=step, loss=f"{loss:.4f}", val=_fmt(self.val_loss, ".4f"), lr=f"{lr:.2e}",
                tps=f"{tokens_per_s:,.0f}", mfu="-" if mfu is None else f"{mfu:.1%}",
                mem="-" if memory_gib is None else f"{memory_gib:.2f}",
            )
        else:
            mfu_text = "" if mfu is None else f" mfu {mfu:.1%}"
            mem_text = "" if memory_gib is None else f" peak mem {memory_gib:.2f} GiB/rank"
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s{mfu_text}{mem_text} "
                  f"elapsed {time.time() - self.started:.1f}s", flush=True)

    def evaluation(self, step: int, train_loss: float, val_loss: float, val_bpb: float | None = None) -> None:
        self.val_loss = val_loss
        bpb = "" if val_bpb is None else f" ({val_bpb:.4f} bits per byte)"
        self.log(f"eval step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} nats per token{bpb}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def log_start(console: TrainingConsole, accelerator, config: RunConfig, model_config, report: dict,
              start_from: Path | None, start_step: int, imported: dict | None) -> None:
    """What the run is, on the console: versions and device, the model, the resolved config, where it starts."""
    console.log(
        f"gpt {report['versions']['gpt']} · torch {torch.__version__} · {report['device_name']} "
        f"({report['device']}) · world size {report['world_size']} · precision {report['mixed_precision']} · "
        f"{torch.get_num_threads()} threads/process"
    )
    if accelerator.device.type == "cuda" and peak_flops(accelerator.device, accelerator.mixed_precision) is None:
        console.log(f"MFU: unknown GPU {torch.cuda.get_device_name(accelerator.device)!r} (no peak in "
                    "launch.flops.PEAK_FLOPS), so no MFU is shown")
    console.log(f"model: {model_config.num_layers} layers, {model_config.num_heads} heads, "
                f"{model_config.embedding_dim} dim, block {model_config.block_size}, vocab {model_config.vocab_size}, "
                f"{report['model_parameters'] / 1e6:.2f}M parameters · out_dir {config.train.out_dir}")
    for section, values in report["resolved_config"].items():
        console.log(f"{section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if "sharding" in report:
        sh = report["sharding"]
        console.log(f"sharded: {sh['strategy']} over {sh['world_size']} ranks; this rank holds "
                    f"{sh['parameters_here'] / 1e6:.2f}M of {sh['parameters'] / 1e6:.2f}M parameters and their "
                    f"gradients and optimizer state (e.g. {sh['example']})")
    if imported is not None:
        p = imported["parity"]
        checked = (f"logits within {p['max_rel_logit_error']:.1e} of transformers', greedy {p['greedy_tokens']} "
                   f"tokens identical: {p['greedy_identical']}" if p.get("checked") else p.get("note", "not compared"))
        source = config.model.init_from or "train.init_from"
        console.log(f"starting from {source} ({imported['from']}): {checked}")
    else:
        console.log(f"resuming from {start_from} at step {start_step}" if start_from else "starting from scratch")


def chat_summary(corpus: TokenizedCorpus) -> str:
    """What fine-tuning learns from: conversations, packed rows, the tokens the loss counts, what was left out."""
    st = corpus.stats
    splits = "; ".join(f"{name} {s['conversations']:,} conversations in {s['rows']:,} rows, {s['trained_tokens']:,} of "
                       f"{s['packed_tokens']:,} tokens learned" for name, s in st["splits"].items())
    skipped = ", ".join(f"{n} {k}" for k, n in st["skipped"].items()) or "nothing"
    where = f" (first: {'; '.join(st['skipped_examples'][:3])})" if st["skipped_examples"] else ""
    return f"chat data: {splits}; left out: {skipped}{where}; a turn ends with {corpus.tokenizer.chat.eos_token}"
