"""Training with Hugging Face Accelerate: one CPU, one GPU, DDP over GPUs or CPU processes, many machines.

    setup()     validates the config and the out_dir, before any work
    main()      builds the Accelerator, data, model and optimizer, restores a checkpoint on --resume
    fit()       the loop: get_lr() → train_step() (micro-steps with accumulate/backward → clip → step);
                validate() every eval_interval, save_checkpoint() every checkpoint_interval

Which batch a step sees is a function of (seed, step, shard), the learning rate a function of the
step, and Accelerate saves the optimizer and RNG states, so a run killed at any moment and resumed
from its last checkpoint ends bit-identical (on CPU) to one never interrupted. The rest of the room:
launch/start.py (from scratch, a transformers folder or a run of ours), launch/environment.py
(Accelerator, lock, report), launch/checkpointing.py (the collective save),
launch/flops.py (MFU), launch/metrics.py (metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from gpt.checkpoint import latest_checkpoint, read_meta, read_run_config
from gpt.config import ConfigError, RunConfig, load_run_config
from gpt.data import TokenizedCorpus, bits_per_byte, get_batch, prepare, require_windows
from gpt.datasets import DataError
from gpt.files import write_atomic
from gpt.model import GPT
from gpt.sft import PackedRows, get_rows, prepare_chat
from launch import TrainingError
from launch.checkpointing import check_same_data, register_hooks, save_checkpoint
from launch.console import TrainingConsole
from launch.environment import (
    agree_on_start,
    environment_report,
    lock_run_folder,
    make_accelerator,
    release_run_folder,
)
from launch.flops import peak_flops
from launch.metrics import append_metrics, truncate_metrics
from launch.optim import make_optimizers, set_lr
from launch.start import base_tokenizer, build_model, take_shape_from_hf, take_shape_from_run


def get_lr(step: int, config: RunConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    t = config.train
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    decay_iters = t.resolved_lr_decay_iters
    if step >= decay_iters:
        return t.resolved_min_lr
    ratio = (step - t.warmup_iters) / (decay_iters - t.warmup_iters)
    return t.resolved_min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.resolved_min_lr)


# --- setup: everything that can fail without touching data or devices ----------------------------

def setup(config_path: str, overrides: list[str], resume: bool) -> tuple[RunConfig, Path | None]:
    """Load and validate the config and decide where to start. Raises before any work is done."""
    config = load_run_config(config_path, overrides)
    if config.model.init_from:
        config = take_shape_from_hf(config)
    if config.train.init_from:
        config = take_shape_from_run(config, latest_checkpoint(config.train.out_dir) if resume else None)
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use --train.device=auto or cpu")
    if config.train.mixed_precision == "fp16" and not (config.train.device != "cpu" and torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device: use bf16 or no on CPU")
    out_dir = Path(config.train.out_dir)
    lock_run_folder(out_dir)
    start_from = latest_checkpoint(out_dir)
    if start_from is not None and not resume:
        raise ConfigError(
            f"train.out_dir={out_dir} already holds checkpoints (latest {start_from.name}): pass --resume to continue "
            "that run, or choose another --train.out_dir"
        )
    if start_from is not None:
        saved = read_run_config(start_from)
        current, defaults = config.to_dict(), RunConfig().to_dict()  # a key a run did not have had its default
        diffs = [f"{section}.{k}: checkpoint {saved[section].get(k, defaults[section][k])!r}, config {v!r}"
                 for section in ("model", "data") for k, v in current[section].items()
                 if saved[section].get(k, defaults[section][k]) != v]
        if diffs:
            raise ConfigError(
                f"cannot resume {start_from}: the config differs from the run's ({'; '.join(diffs)}); "
                "resume with the run's own config, or start a new out_dir"
            )
    return config, start_from


# --- main: the Accelerator, data, model and optimizer; then fit -----------------------------------

class TrainResult(NamedTuple):
    metrics: dict  # the last logged and evaluated values
    model: GPT  # the trained model, unwrapped from DDP and torch.compile


def main(config: RunConfig, start_from: Path | None) -> TrainResult:
    """Train per `config`, continuing from checkpoint `start_from` if given (setup() decides both)."""
    try:
        return _train(config, start_from)
    finally:
        release_run_folder(Path(config.train.out_dir))


def _train(config: RunConfig, start_from: Path | None) -> TrainResult:
    accelerator = make_accelerator(config)
    t = config.train
    out_dir = Path(t.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    start_from = agree_on_start(accelerator, start_from)
    corpus = load_corpus(config, start_from)
    model_config = dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size)
    model, imported = build_model(config, model_config, start_from, accelerator)
    flops_per_token = model.flops_per_token()
    report = environment_report(accelerator, config, model)
    if imported is not None:
        report["init_from"] = imported
    optimizers = make_optimizers(model, t, accelerator.device)  # AdamW, or Muon and AdamW (launch/optim.py)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    # From here each rank draws its own random numbers (dropout masks), as nanoGPT offsets the seed
    # by rank; rank 0 keeps the seed, so one process trains as before. Batches do not depend on it.
    from accelerate.utils import set_seed

    set_seed(t.seed + accelerator.process_index)
    register_hooks(accelerator)

    start_step = 0
    if start_from is not None:
        accelerator.load_state(str(start_from))
        start_step = read_meta(start_from)["step"]
    if accelerator.is_main_process:
        if start_from is None:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(out_dir / "metrics.jsonl", start_step)
        write_atomic(out_dir / "run.json", json.dumps({**report, "resumed_from": str(start_from or "")}, indent=2))
    if t.log_with != "none":
        flat = {f"{section}.{k}": v for section, values in config.to_dict().items() for k, v in values.items()}
        accelerator.init_trackers("gpt", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                 for k, v in flat.items()})

    console = TrainingConsole(t.max_iters, start_step, enabled=accelerator.is_main_process)
    log_start(console, accelerator, config, model_config, report, start_from, start_step, imported)
    if config.data.format == "chat":
        console.log(chat_summary(corpus))
    try:
        last = fit(accelerator, model, optimizers, corpus, config, start_step, console, flops_per_token)
    finally:
        console.close()
    if t.log_with != "none":
        accelerator.end_training()
    if accelerator.is_main_process and importlib.util.find_spec("matplotlib") is not None:
        from launch.plot import plot_losses

        console.log(f"wrote {plot_losses(out_dir)}")
    accelerator.wait_for_everyone()
    return TrainResult(last, accelerator.unwrap_model(model, keep_torch_compile=False))


def load_corpus(config: RunConfig, start_from: Path | None) -> TokenizedCorpus:
    """The prepared corpus, checked against the run being resumed and against the model's window.

    Every rank calls prepare(): a lock in the cache lets the first one download and tokenize while
    the others wait on the lock, not in a collective, so a long first tokenization cannot run into
    the process group's timeout."""
    if config.data.format == "chat":
        corpus = prepare_chat(config.data, config.model.block_size, base_tokenizer(config, start_from))
    else:
        corpus = prepare(config.data)
        if config.train.init_from and corpus.tokenizer != base_tokenizer(config):
            raise ConfigError(f"train.init_from={config.train.init_from} was trained with another vocabulary than "
                              "this text's: fine-tune a char model on text in its characters, or use "
                              "data.tokenizer=bpe (the model's own tokenizer.json is then used)")
    if start_from is not None:
        check_same_data(start_from, corpus)
    for split in ("train", "val"):
        if config.data.format == "text":
            require_windows(corpus.split(split), config.model.block_size, split)
        elif len(corpus.split(split)) == 0:
            raise DataError(f"the {split} split holds no conversation ({corpus.stats['splits']}): add conversations, "
                            "or change data.val_fraction")
    return corpus


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


# --- fit: the loop ---------------------------------------------------------------------------------

def fit(accelerator, model, optimizers: list, corpus: TokenizedCorpus, config: RunConfig, start_step: int,
        console: TrainingConsole, flops_per_token: float) -> dict:
    """The loop from start_step to max_iters; returns the last logged and evaluated values."""
    t = config.train
    log = StepLog(accelerator, config, console, flops_per_token)
    last = {"step": start_step}
    if start_step == 0:  # where the untrained model starts: near ln(vocab_size)
        last.update(evaluate(accelerator, model, corpus, config, console, 0))
    model.train()
    log.restart_clock()
    for step in range(start_step, t.max_iters):
        lr = get_lr(step, config)
        set_lr(optimizers, lr / t.learning_rate)  # every group follows the schedule from its own peak
        log.add(train_step(accelerator, model, optimizers, corpus.train, config, step))
        done = step + 1
        evaluated = done % t.eval_interval == 0 or done == t.max_iters
        saving = done % t.checkpoint_interval == 0 or done == t.max_iters
        if done % t.log_interval == 0 or evaluated or saving:
            last.update(log.flush(done, lr))  # before any save: a diverged model is never checkpointed
        if evaluated:
            last.update(evaluate(accelerator, model, corpus, config, console, done))
        if saving:
            path = save_checkpoint(accelerator, model, corpus, config, done,
                                   {k: v for k, v in last.items() if k != "step"})
            console.log(f"saved {path}")
        if evaluated or saving:
            log.restart_clock()  # keep evaluation and saving out of tokens/s
    return last


class StepLog:
    """The train loss and speed since the last log line: the loss summed on the device and reduced
    over the ranks only when a line is due, tokens/s and MFU from the wall clock."""

    def __init__(self, accelerator, config: RunConfig, console: TrainingConsole, flops_per_token: float):
        t = config.train
        self.accelerator, self.config, self.console = accelerator, config, console
        self.tokens_per_step = t.batch_size * config.model.block_size * t.gradient_accumulation_steps * \
            accelerator.num_processes
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(accelerator.device, accelerator.mixed_precision)
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.timer = time.perf_counter()

    def add(self, loss_sum: torch.Tensor) -> None:
        self.loss_sum += loss_sum
        self.steps += 1

    def flush(self, done: int, lr: float) -> dict:
        """The mean train loss since the last line, over all ranks, on the console, in metrics.jsonl
        and the trackers; a non-finite loss stops the run."""
        a, t = self.accelerator, self.config.train
        mean_loss = a.reduce(self.loss_sum, reduction="mean").item() / (self.steps * t.gradient_accumulation_steps)
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss became {mean_loss} by step {done}: training diverged; lower train.learning_rate or "
                f"raise train.warmup_iters; the last good checkpoint is {latest_checkpoint(t.out_dir) or 'none'}"
            )
        tps = self.tokens_per_step * self.steps / (time.perf_counter() - self.timer)
        mfu = self.flops_per_token * tps / (self.peak * a.num_processes) if self.peak else None
        record = {"step": done, "train_loss": mean_loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu}
        self.console.step(done, mean_loss, lr, tps, mfu)
        if a.is_main_process:
            append_metrics(Path(t.out_dir) / "metrics.jsonl", {**record, "time": time.time()})
        a.log({"train/loss": mean_loss, "lr": lr, "tokens_per_s": tps, **({"mfu": mfu} if mfu else {})}, step=done)
        self.loss_sum.zero_()
        self.steps = 0
        self.restart_clock()
        return record


def evaluate(accelerator, model, corpus: TokenizedCorpus, config: RunConfig, console: TrainingConsole,
             done: int) -> dict:
    """validate(), shown, written to metrics.jsonl and the trackers; a non-finite loss stops the run."""
    losses = validate(model, corpus, config, accelerator)
    bpb = bits_per_byte(losses["val"], corpus.bytes_per_token("val"))  # compares tokenizers
    console.evaluation(done, losses["train"], losses["val"], bpb)
    if accelerator.is_main_process:
        append_metrics(Path(config.train.out_dir) / "metrics.jsonl",
                       {"step": done, "eval_train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb,
                        "time": time.time()})
    accelerator.log({"eval/train_loss": losses["train"], "eval/val_loss": losses["val"],
                     **({"eval/val_bpb": bpb} if bpb is not None else {})}, step=done)
    if not math.isfinite(losses["val"]):
        raise TrainingError(f"validation loss is {losses['val']} at step {done}: training diverged; "
                            f"the last good checkpoint is {latest_checkpoint(config.train.out_dir) or 'none'}")
    return {"eval_train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb, "evaluated_at": done}

def train_step(accelerator, model, optimizers: list, train_data, config: RunConfig, step: int) -> torch.Tensor:
    """One optimizer step: gradient_accumulation_steps micro-batches (this rank's shards of the
    step's global batch), backward, clip, step. Returns the summed micro-batch losses."""
    t, block = config.train, config.model.block_size
    world = accelerator.num_processes
    total = torch.zeros((), device=accelerator.device)
    for micro in range(t.gradient_accumulation_steps):
        shard = micro * world + accelerator.process_index
        batch = draw(train_data, t.batch_size, block, t.seed, "train", step, shard)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = model(**{k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
    return total


def draw(data, batch_size: int, block: int, seed: int, split: str, step: int, shard: int,
         evaluation: bool = False) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for one micro-batch: random windows of text (gpt.data.get_batch),
    or random packed rows of conversations, learned on the assistant's turns only (gpt.sft.get_rows)."""
    if isinstance(data, PackedRows):
        return get_rows(data, batch_size, seed, split, step, shard, evaluation)
    x, y = get_batch(data, batch_size, block, seed, split, step, shard, evaluation)
    return {"input_ids": x, "targets": y}


@torch.no_grad()
def validate(model, corpus: TokenizedCorpus, config: RunConfig, accelerator) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches per process of each split, averaged over all ranks."""
    model.eval()
    t, block = config.train, config.model.block_size
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=accelerator.device)
        for i in range(t.eval_iters):
            batch = draw(corpus.split(split), t.batch_size, block, t.seed, split, i, accelerator.process_index,
                         evaluation=True)
            with accelerator.autocast():
                total += model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss.float()
        losses[split] = accelerator.gather_for_metrics((total / t.eval_iters).reshape(1)).mean().item()
    model.train()
    return losses
