"""Training with Hugging Face Accelerate: one CPU, one GPU, DDP or FSDP2 over GPUs or CPU processes, many machines.

    setup()       validates the config and the out_dir, before any work
    main()        builds the Accelerator, data, model and optimizer, restores a checkpoint on --resume
    distribute()  the model across the ranks: wrapped in DDP by Accelerate, or sharded (FSDP2)
    fit()         the loop: get_lr() → train_step() (micro-steps with accumulate/backward → clip → step);
                  validate() every eval_interval, save_checkpoint() every checkpoint_interval

Which batch a step sees is a function of (seed, step, shard), the learning rate a function of the
step, and each checkpoint holds the optimizer and RNG states, so a run killed at any moment and
resumed from its last checkpoint ends bit-identical (on CPU) to one never interrupted. The rest of the
room: launch/start.py (from scratch, a transformers folder or a run of ours), launch/environment.py
(Accelerator, lock, report), launch/sharding.py (FSDP2), launch/checkpointing.py (the collective
save, full or sharded), launch/console.py (what the run shows), launch/flops.py (MFU),
launch/metrics.py (metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from gpt.checkpoint import is_sharded_checkpoint, latest_checkpoint, read_meta, read_run_config
from gpt.config import ConfigError, RunConfig, load_run_config
from gpt.data import TokenizedCorpus, bits_per_byte, get_batch, prepare, require_windows
from gpt.datasets import DataError
from gpt.files import write_atomic
from gpt.model import GPT
from gpt.sft import PackedRows, get_rows, prepare_chat
from launch import TrainingError
from launch.checkpointing import (
    check_same_data,
    load_sharded_state,
    register_hooks,
    save_checkpoint,
)
from launch.console import TrainingConsole, chat_summary, log_start
from launch.environment import (
    agree_on_start,
    environment_report,
    lock_run_folder,
    make_accelerator,
    release_run_folder,
    resolve_accumulation,
)
from launch.flops import peak_flops
from launch.metrics import append_metrics, truncate_metrics
from launch.optim import make_optimizers, set_lr
from launch.sharding import (
    activation_checkpointing,
    check_fsdp,
    fsdp_requested,
    peak_memory_gib,
    shard,
    sharding_report,
    world_size,
)
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
    config = resolve_accumulation(config, world_size())
    if config.model.init_from:
        config = take_shape_from_hf(config)
    if config.train.init_from:
        config = take_shape_from_run(config, latest_checkpoint(config.train.out_dir) if resume else None)
    check_fsdp(config)
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
        sharded = is_sharded_checkpoint(start_from)
        if sharded != fsdp_requested(config):
            how = ("launch it with configs/accelerate/fsdp.yaml (on any number of processes)" if sharded
                   else "launch it as it was, without FSDP")
            raise ConfigError(
                f"cannot resume {start_from}: it was written {'with' if sharded else 'without'} FSDP "
                f"(train.parallelism): {how}, or start a new --train.out_dir from its weights with "
                f"--train.init_from={start_from}"
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
    fsdp = fsdp_requested(config)
    accelerator = make_accelerator(config, fsdp)
    t = config.train
    out_dir = Path(t.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    start_from = agree_on_start(accelerator, start_from)
    corpus = load_corpus(config, start_from)
    model_config = dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size)
    model, imported = build_model(config, model_config, start_from, accelerator)
    model.activation_checkpointing = activation_checkpointing(config)
    flops_per_token = model.flops_per_token()
    report = environment_report(accelerator, config, model)
    if imported is not None:
        report["init_from"] = imported
    model, optimizers = distribute(accelerator, model, config, fsdp, report)
    # From here each rank draws its own random numbers (dropout masks), as nanoGPT offsets the seed
    # by rank; rank 0 keeps the seed, so one process trains as before. Batches do not depend on it.
    from accelerate.utils import set_seed

    set_seed(t.seed + accelerator.process_index)
    register_hooks(accelerator)

    start_step = 0
    if start_from is not None:
        if fsdp:
            load_sharded_state(accelerator, model, optimizers, start_from)
        else:
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
    if accelerator.is_main_process:
        from launch.plot import loss_svg

        console.log(f"wrote {loss_svg(out_dir)}")
    accelerator.wait_for_everyone()
    return TrainResult(last, accelerator.unwrap_model(model, keep_torch_compile=False))


def distribute(accelerator, model: GPT, config: RunConfig, fsdp: bool, report: dict) -> tuple[GPT, list]:
    """The model and its optimizers (AdamW, or Muon and AdamW: launch/optim.py) on the device and across
    the ranks: sharded by FSDP2 (launch/sharding.py), or wrapped by Accelerate (DDP, torch.compile)."""
    if fsdp:  # every rank keeps its own rows of each weight
        model = shard(model, config, accelerator.device)
        report.update(distributed_type="FSDP2", sharding=sharding_report(model))
    optimizers = make_optimizers(model, config.train, accelerator.device)
    if not fsdp:
        model, *optimizers = accelerator.prepare(model, *optimizers)
        return model, optimizers
    prepared = accelerator.prepare(*optimizers)  # not the model: on a CPU Accelerate would wrap it in DDP
    return model, list(prepared) if len(optimizers) > 1 else [prepared]


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
            path = save_checkpoint(accelerator, model, optimizers, corpus, config, done,
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
        memory = torch.tensor([peak_memory_gib(a.device)], device=a.device)
        memory = a.gather(memory).max().item() if a.num_processes > 1 else memory.item()  # the fullest rank's
        record = {"step": done, "train_loss": mean_loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu,
                  "peak_memory_gib": memory}
        self.console.step(done, mean_loss, lr, tps, mfu, memory)
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
