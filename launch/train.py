"""Training with Hugging Face Accelerate: one CPU, one GPU, DDP over GPUs or CPU processes, many machines.

    setup()  validates the config and the out_dir, before any work
    main()   builds the Accelerator, data, model and optimizer, restores a checkpoint on --resume
    fit()    the loop: get_lr() → micro-steps with accumulate/backward → clip → step;
             validate() every eval_interval, save_checkpoint() every checkpoint_interval

Which batch a step sees is a function of (seed, step, shard), the learning rate a function of the
step, and Accelerate saves the optimizer and RNG states, so a run killed at any moment and resumed
from its last checkpoint ends bit-identical (on CPU) to one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

from gpt.checkpoint import (
    best_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    missing_files,
    read_meta,
    write_model_files,
)
from gpt.config import ConfigError, RunConfig, load_run_config
from gpt.data import TokenizedCorpus, bits_per_byte, get_batch, prepare
from gpt.files import FolderInUse, FolderLock, publish_folder, write_atomic
from gpt.model import GPT
from gpt.tokenizer import tokenizer_sha256
from launch.console import TrainingConsole


class TrainingError(RuntimeError):
    """Training cannot go on. The message says why and what to do."""


# Dense peak FLOP/s for MFU, by the exact name torch.cuda.get_device_name() gives (less "NVIDIA "),
# per mixed_precision; "no" is fp32, which runs on TF32 tensor cores (make_accelerator allows it).
# Variants differ (H100 SXM, PCIe and NVL are three numbers), so a name not listed gets no MFU
# rather than a guess.
_HOPPER_SXM = {"bf16": 989e12, "fp16": 989e12, "no": 494e12}
_AMPERE_A100 = {"bf16": 312e12, "fp16": 312e12, "no": 156e12}
PEAK_FLOPS = {
    "H100 80GB HBM3": _HOPPER_SXM,
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "no": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "no": 417e12},
    "H200": _HOPPER_SXM,
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "no": 417e12},
    "A100-SXM4-40GB": _AMPERE_A100,
    "A100-SXM4-80GB": _AMPERE_A100,
    "A100-PCIE-40GB": _AMPERE_A100,
    "A100 80GB PCIe": _AMPERE_A100,
    "A10": {"bf16": 125e12, "fp16": 125e12, "no": 62.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "no": 60e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "no": 183e12},
    "GeForce RTX 4090": {"bf16": 165e12, "fp16": 165e12, "no": 82.6e12},
}


def peak_flops_for(name: str, precision: str) -> float | None:
    """The peak for a GPU name as torch reports it, or None for a GPU not in the table."""
    table = PEAK_FLOPS.get(name.strip().removeprefix("NVIDIA ").strip())
    return None if table is None else table[precision]


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), precision)


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
        saved = json.loads((start_from / "run_config.json").read_text())
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


def take_shape_from_hf(config: RunConfig) -> RunConfig:
    """model.init_from=hf:...: the model's shape and the tokenizer come from the transformers folder;
    the run config keeps its dropout and everything else."""
    from gpt.hf import HFError, read_config, read_tokenizer, resolve_folder, weights_path

    try:
        folder = resolve_folder(config.model.init_from)
        shape = read_config(folder)
        weights_path(folder)
        read_tokenizer(folder, shape.vocab_size)
    except HFError as e:
        raise ConfigError(str(e)) from None
    d = config.data
    tokenizer_file = str(folder / "tokenizer.json")
    if d.tokenizer_file not in (None, tokenizer_file):
        raise ConfigError(f"data.tokenizer_file={d.tokenizer_file} differs from the imported model's "
                          f"{tokenizer_file}: drop it, the model brings its own")
    model = dataclasses.replace(shape, vocab_size=0, dropout=config.model.dropout, init_from=config.model.init_from)
    data = dataclasses.replace(d, tokenizer="bpe", tokenizer_file=tokenizer_file)
    return dataclasses.replace(config, model=model, data=data)


_LOCKS: dict[Path, FolderLock] = {}


def lock_run_folder(out_dir: Path) -> None:
    """Hold train.out_dir for this run (the main process of a launch), so a second launch on the same
    folder, or a requeued job whose old copy still runs, fails at once instead of mixing checkpoints.
    The lock lives until release_run_folder() or the process ends, however it ends."""
    if os.environ.get("RANK", "0") != "0":
        return
    key = out_dir.resolve()
    if key in _LOCKS:
        return
    try:
        _LOCKS[key] = FolderLock(out_dir)
    except FolderInUse as e:
        raise ConfigError(f"train.out_dir: {e}: wait for that run to end (or stop it), or choose another "
                          "--train.out_dir") from None


def release_run_folder(out_dir: Path) -> None:
    lock = _LOCKS.pop(out_dir.resolve(), None)
    if lock is not None:
        lock.release()


def check_same_data(checkpoint: Path, corpus: TokenizedCorpus) -> None:
    """Refuse to resume on another text or vocabulary: the same ids would silently mean other characters."""
    meta = read_meta(checkpoint)
    problems = []
    saved_corpus = meta.get("corpus_sha256")
    if saved_corpus and corpus.sha256 and saved_corpus != corpus.sha256:
        problems.append(f"the corpus has sha256 {corpus.sha256[:12]}…, the run trained on {saved_corpus[:12]}…")
    saved_tokenizer = meta.get("tokenizer_sha256")
    if saved_tokenizer is None:  # an older checkpoint: compare the tokenizer itself
        from gpt.tokenizer import load_tokenizer

        same = load_tokenizer(checkpoint / "tokenizer.json") == corpus.tokenizer
    else:
        same = saved_tokenizer == tokenizer_sha256(corpus.tokenizer)
    if not same:
        problems.append("the tokenizer differs from the run's")
    if problems:
        raise TrainingError(f"cannot resume {checkpoint}: {'; '.join(problems)}; resume with the run's own text, "
                            "or start a new --train.out_dir")


# --- the distributed environment ------------------------------------------------------------------

def check_world_size(joined: int) -> None:
    """Refuse to train when the launcher started more processes than joined the process group.

    Launching mistakes (`--multi_gpu` without GPUs and a plain Accelerator(), torchrun with a
    config that disables distribution, ...) start N processes that each believe they are rank 0:
    they train N unsynchronised copies and overwrite each other's checkpoints.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != joined:
        raise TrainingError(
            f"the launcher started WORLD_SIZE={launched} processes but {joined} joined the process group "
            "(each would train alone as rank 0): on a machine without GPUs launch with "
            "--config_file configs/accelerate/cpu_ddp.yaml, or set ACCELERATE_USE_CPU=1"
        )


def make_accelerator(config: RunConfig):
    """An Accelerator that really synchronises, on GPUs or on CPU processes (gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin

    t = config.train
    # Without a GPU, DDP over CPU processes needs Accelerator(cpu=True): otherwise each process
    # started by `accelerate launch --multi_gpu` initialises no process group and believes it is rank 0.
    use_cpu = t.device == "cpu" or not torch.cuda.is_available()
    log_with = None
    if t.tensorboard:
        if importlib.util.find_spec("tensorboard") is not None:
            log_with = "tensorboard"
        else:
            print("train.tensorboard=true but tensorboard is not installed (pip install tensorboard); not logging it",
                  file=sys.stderr)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=t.out_dir, logging_dir=str(Path(t.out_dir) / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))],
        # prepare() compiles after wrapping in DDP, so unwrap_model(keep_torch_compile=False) gives
        # back the plain model and checkpoints keep plain keys (compiling first would save `_orig_mod.`)
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
    )
    check_world_size(accelerator.num_processes)
    if use_cpu:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(t.threads or max(1, cores // local))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def environment_report(accelerator, config: RunConfig, model: GPT) -> dict:
    import accelerate

    resolved = config.to_dict()  # with what the config leaves to defaults filled in
    resolved["model"] = dataclasses.asdict(model.config)
    resolved["train"].update(min_lr=config.train.resolved_min_lr, lr_decay_iters=config.train.resolved_lr_decay_iters)
    return {
        "config": config.to_dict(),
        "resolved_config": resolved,
        "model_parameters": model.num_parameters(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "accelerate": accelerate.__version__, "gpt": __import__("gpt").__version__},
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "distributed_type": str(accelerator.distributed_type),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def agree_on_start(accelerator, start_from: Path | None) -> Path | None:
    """Every rank resumes from the checkpoint the main process chose: on a shared file system that
    lags, ranks looking for themselves could each find a different newest checkpoint."""
    if accelerator.num_processes == 1:
        return start_from
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([str(start_from) if start_from is not None else None])[0]
    path = Path(chosen) if chosen is not None else None
    if path is not None and missing_files(path):
        raise TrainingError(f"rank {accelerator.process_index} cannot read checkpoint {path} (chosen by the main "
                            "process) whole: train.out_dir must be on storage every machine shares")
    return path


# --- evaluation and checkpoints -------------------------------------------------------------------

@torch.no_grad()
def validate(model, corpus: TokenizedCorpus, config: RunConfig, accelerator) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches per process of each split, averaged over all ranks."""
    model.eval()
    t, block = config.train, config.model.block_size
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=accelerator.device)
        for i in range(t.eval_iters):
            x, y = get_batch(corpus.split(split), t.batch_size, block, t.seed, split, i, accelerator.process_index,
                             evaluation=True)
            with accelerator.autocast():
                total += model(x.to(accelerator.device), y.to(accelerator.device)).loss.float()
        losses[split] = accelerator.gather_for_metrics((total / t.eval_iters).reshape(1)).mean().item()
    model.train()
    return losses


@contextlib.contextmanager
def one_scaler_writer(accelerator):
    """With fp16, save_state writes the (identical) grad scaler from every rank into the same
    scaler.pt; on a shared file system those writes race. Only the main process keeps it."""
    scaler = accelerator.scaler
    if scaler is not None and not accelerator.is_main_process:
        accelerator.scaler = None
    try:
        yield
    finally:
        accelerator.scaler = scaler


def save_checkpoint(accelerator, model, corpus: TokenizedCorpus, config: RunConfig, step: int, meta: dict) -> Path:
    """Write checkpoints/step-NNNNNN so that it is published whole or not at all.

    Every process takes part: all check that the weights are finite, all save their state (each its
    own RNG file) into a temporary folder, and all wait until every one has finished. Only then does
    the main process check that each rank's file is there, write the model files and meta.json
    (which lists every file with its size), flush it all to disk, rename the folder into place, move
    the `latest` pointer (and `best`, if this step was evaluated and its validation loss is the
    lowest yet) and prune to the newest keep_checkpoints plus the best. A failure is raised on every
    rank.
    """
    out_dir = Path(config.train.out_dir)
    root = out_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    # The loss check before a save sees the loss before the last optimizer step; the step itself
    # can still overflow. A collective count, so every rank takes the same branch.
    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach())).sum()
    bad = int(accelerator.reduce(bad, reduction="sum").item())
    if bad:
        raise TrainingError(
            f"{bad} weights became inf/NaN at step {step}: training diverged and this checkpoint is not saved; "
            f"the last good checkpoint is {latest_checkpoint(out_dir) or 'none'}; resume from it with a lower "
            "train.learning_rate or a train.grad_clip"
        )
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with one_scaler_writer(accelerator):
        accelerator.save_state(str(tmp))  # optimizer, RNG states, grad scaler; weights via the hook below
    accelerator.wait_for_everyone()  # save_state ends without a barrier; a slow rank may still be writing
    problem = ""
    if accelerator.is_main_process:
        problem = publish_checkpoint(accelerator, model, corpus, config, step, meta, tmp, final)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise TrainingError(problem)
    return final


def publish_checkpoint(accelerator, model, corpus: TokenizedCorpus, config: RunConfig, step: int, meta: dict,
                       tmp: Path, final: Path) -> str:
    """The main process's part, once every rank has saved: check each rank's file, write the model files
    and meta.json, publish durably, move `latest` (and `best`), prune. Returns a problem, or ""."""
    from accelerate.utils import RNG_STATE_NAME

    out_dir, root = Path(config.train.out_dir), final.parent
    missing = [f"{RNG_STATE_NAME}_{r}.pkl" for r in range(accelerator.num_processes)
               if not (tmp / f"{RNG_STATE_NAME}_{r}.pkl").is_file()]
    if missing:
        return (f"checkpoint {final.name} lacks {', '.join(missing)} after every rank saved: on several machines "
                "train.out_dir must be on storage they all share; the checkpoint is not published")
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    write_model_files(tmp, unwrapped, corpus.tokenizer, {"step": step, "corpus_sha256": corpus.sha256, **meta},
                      config.to_dict())
    publish_folder(tmp, final, replace=True)  # fsync files and folders, then rename
    write_atomic(root / "latest", final.name)
    best = best_checkpoint(out_dir)
    if meta.get("evaluated_at") == step and math.isfinite(meta.get("val_loss", math.inf)) and (
            best is None or meta["val_loss"] < read_meta(best).get("val_loss", math.inf)):
        write_atomic(root / "best", final.name)
        best = final
    for old in list_checkpoints(out_dir)[: -config.train.keep_checkpoints]:
        if old != best:  # the best validation loss is kept however old it is
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.old-*"):  # left by a crash between two renames
        shutil.rmtree(stale, ignore_errors=True)
    return ""


def _skip_weights_in_save_state(models, weights, output_dir) -> None:
    weights.clear()  # the checkpoint's model.safetensors is written with plain keys by write_model_files


def _load_weights_for_load_state(models, input_dir) -> None:
    from accelerate.utils import extract_model_from_parallel

    for model in models:
        load_weights(extract_model_from_parallel(model, keep_torch_compile=False), Path(input_dir))
    models.clear()  # already loaded; Accelerate restores the optimizer and RNG states


# --- the loop --------------------------------------------------------------------------------------

def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (the resumed run writes them again) and any torn
    line a kill in mid-write left behind."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def fit(accelerator, model, optimizer, corpus: TokenizedCorpus, config: RunConfig, start_step: int,
        console: TrainingConsole, flops_per_token: float) -> dict:
    t = config.train
    out_dir = Path(t.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    world = accelerator.num_processes
    tokens_per_step = t.batch_size * config.model.block_size * t.gradient_accumulation_steps * world
    peak = peak_flops(accelerator.device, accelerator.mixed_precision)
    train_data = corpus.train
    last = {"step": start_step}

    def evaluate(done: int) -> None:
        losses = validate(model, corpus, config, accelerator)
        bpb = bits_per_byte(losses["val"], corpus.bytes_per_token("val"))  # compares tokenizers
        console.evaluation(done, losses["train"], losses["val"], bpb)
        if accelerator.is_main_process:
            append_metrics(metrics_path, {"step": done, "eval_train_loss": losses["train"],
                                          "val_loss": losses["val"], "val_bpb": bpb, "time": time.time()})
        accelerator.log({"eval/train_loss": losses["train"], "eval/val_loss": losses["val"],
                         **({"eval/val_bpb": bpb} if bpb is not None else {})}, step=done)
        last.update(eval_train_loss=losses["train"], val_loss=losses["val"], val_bpb=bpb, evaluated_at=done)
        if not math.isfinite(losses["val"]):
            raise TrainingError(f"validation loss is {losses['val']} at step {done}: training diverged; "
                                f"the last good checkpoint is {latest_checkpoint(out_dir) or 'none'}")

    if start_step == 0:  # where the untrained model starts: near ln(vocab_size)
        evaluate(0)
    model.train()
    timer, timed_steps = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=accelerator.device)

    for step in range(start_step, t.max_iters):
        lr = get_lr(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum += train_step(accelerator, model, optimizer, train_data, config, step)
        timed_steps += 1
        done = step + 1

        evaluated = done % t.eval_interval == 0 or done == t.max_iters
        saving = done % t.checkpoint_interval == 0 or done == t.max_iters
        if done % t.log_interval == 0 or evaluated or saving:
            # the mean train loss since the last log, over all ranks; checked before any save, so a
            # diverged model is never checkpointed
            mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / (
                timed_steps * t.gradient_accumulation_steps)
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"loss became {mean_loss} by step {done}: training diverged; lower train.learning_rate or "
                    f"raise train.warmup_iters; the last good checkpoint is {latest_checkpoint(out_dir) or 'none'}"
                )
            tps = tokens_per_step * timed_steps / (time.perf_counter() - timer)
            mfu = flops_per_token * tps / (peak * world) if peak else None
            record = {"step": done, "train_loss": mean_loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu}
            console.step(done, mean_loss, lr, tps, mfu)
            if accelerator.is_main_process:
                append_metrics(metrics_path, {**record, "time": time.time()})
            accelerator.log({"train/loss": mean_loss, "lr": lr, "tokens_per_s": tps}, step=done)
            last.update(record)
            loss_sum.zero_()
            timer, timed_steps = time.perf_counter(), 0

        if evaluated:
            evaluate(done)

        if saving:
            path = save_checkpoint(accelerator, model, corpus, config, done,
                                   {k: v for k, v in last.items() if k != "step"})
            console.log(f"saved {path}")
        if evaluated or saving:
            timer = time.perf_counter()  # keep evaluation and saving out of tokens/s
    return last


def train_step(accelerator, model, optimizer, train_data, config: RunConfig, step: int) -> torch.Tensor:
    """One optimizer step: gradient_accumulation_steps micro-batches (this rank's shards of the
    step's global batch), backward, clip, step. Returns the summed micro-batch losses."""
    t, block = config.train, config.model.block_size
    world = accelerator.num_processes
    total = torch.zeros((), device=accelerator.device)
    for micro in range(t.gradient_accumulation_steps):
        shard = micro * world + accelerator.process_index
        x, y = get_batch(train_data, t.batch_size, block, t.seed, "train", step, shard)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = model(x.to(accelerator.device, non_blocking=True),
                             y.to(accelerator.device, non_blocking=True)).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
    return total


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
    # fused AdamW: one kernel for all parameters, on CUDA and (since torch 2.4) on CPU
    optimizer = torch.optim.AdamW(model.optimizer_groups(t.weight_decay), lr=t.learning_rate,
                                  betas=(t.beta1, t.beta2), fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    # From here each rank draws its own random numbers (dropout masks), as nanoGPT offsets the seed
    # by rank; rank 0 keeps the seed, so one process trains as before. Batches do not depend on it.
    from accelerate.utils import set_seed

    set_seed(t.seed + accelerator.process_index)
    accelerator.register_save_state_pre_hook(_skip_weights_in_save_state)
    accelerator.register_load_state_pre_hook(_load_weights_for_load_state)

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
    if t.tensorboard:
        accelerator.init_trackers("gpt", config={k: v for k, v in vars(t).items() if v is not None})

    console = TrainingConsole(t.max_iters, start_step, enabled=accelerator.is_main_process)
    log_start(console, accelerator, config, model_config, report, start_from, start_step, imported)
    try:
        last = fit(accelerator, model, optimizer, corpus, config, start_step, console, flops_per_token)
    finally:
        console.close()
    if t.tensorboard:
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
    corpus = prepare(config.data)
    if start_from is not None:
        check_same_data(start_from, corpus)
    block = config.model.block_size
    for split in ("train", "val"):
        if len(corpus.split(split)) <= block:
            raise TrainingError(
                f"the {split} split has {len(corpus.split(split))} tokens, not more than block_size={block}: "
                "use a longer text, a smaller model.block_size or another data.val_fraction"
            )
    return corpus


def build_model(config: RunConfig, model_config, start_from: Path | None, accelerator) -> tuple[GPT, dict | None]:
    """A fresh model, the same on every rank (seeded), or, fine-tuning, one with imported GPT-2 weights
    (and the check of that import against transformers, from the main process)."""
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    if not (config.model.init_from and start_from is None):
        return GPT(model_config), None
    from gpt.hf import import_gpt2, parity_with_transformers, resolve_folder

    folder = resolve_folder(config.model.init_from)
    model = import_gpt2(folder, model_config)
    parity = parity_with_transformers(model, folder) if accelerator.is_main_process else {"checked": False}
    model.train()
    return model, {"from": str(folder), "parity": parity}


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
                    "launch.train.PEAK_FLOPS), so no MFU is shown")
    console.log(f"model: {model_config.num_layers} layers, {model_config.num_heads} heads, "
                f"{model_config.embedding_dim} dim, block {model_config.block_size}, vocab {model_config.vocab_size}, "
                f"{report['model_parameters'] / 1e6:.2f}M parameters · out_dir {config.train.out_dir}")
    for section, values in report["resolved_config"].items():
        console.log(f"{section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if imported is not None:
        p = imported["parity"]
        checked = (f"logits within {p['max_rel_logit_error']:.1e} of transformers', greedy {p['greedy_tokens']} "
                   f"tokens identical: {p['greedy_identical']}" if p.get("checked") else p.get("note", "not compared"))
        console.log(f"starting from {config.model.init_from} ({imported['from']}): {checked}")
    else:
        console.log(f"resuming from {start_from} at step {start_step}" if start_from else "starting from scratch")
