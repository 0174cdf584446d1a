"""Where a run trains: the Accelerator, the processes that joined it, the global batch over them, the
run folder's lock, and the report of versions and devices that goes into RUN_DIR/run.json."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from datetime import timedelta
from pathlib import Path

import torch

from gpt.checkpoint import missing_files
from gpt.config import ConfigError, RunConfig
from gpt.files import FolderInUse, FolderLock
from gpt.model import GPT
from launch import TrainingError

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


def make_accelerator(config: RunConfig, fsdp: bool = False):
    """An Accelerator that really synchronises, on GPUs or on CPU processes (gloo). With `fsdp` the
    trainer shards the model itself (launch/sharding.py): Accelerate is not told, and compiles nothing."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin

    from launch.sharding import accelerate_env
    from launch.trackers import log_with

    t = config.train
    # Without a GPU, DDP over CPU processes needs Accelerator(cpu=True): otherwise each process
    # started by `accelerate launch --multi_gpu` initialises no process group and believes it is rank 0.
    use_cpu = t.device == "cpu" or not torch.cuda.is_available()
    logging_dir = str(Path(t.out_dir) / "tracking")
    with accelerate_env(fsdp):
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            log_with=log_with(t.log_with, logging_dir),
            project_config=ProjectConfiguration(project_dir=t.out_dir, logging_dir=logging_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))],
            # prepare() compiles after wrapping in DDP, so unwrap_model(keep_torch_compile=False) gives
            # back the plain model and checkpoints keep plain keys (compiling first would save `_orig_mod.`)
            dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile and not fsdp else None,
        )
    check_world_size(accelerator.num_processes)
    if fsdp and not torch.distributed.is_initialized():
        # one process: Accelerate starts no process group, and fully_shard needs one (of one rank)
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
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


def resolve_accumulation(config: RunConfig, world: int) -> RunConfig:
    """train.global_batch_size: the sequences of one optimizer step, whatever the number of ranks, so a
    run resumed on other ranks keeps its batch: gradient_accumulation_steps = global / (batch_size x ranks)."""
    t = config.train
    if t.global_batch_size is None:
        return config
    per_micro_step = t.batch_size * world
    if t.global_batch_size % per_micro_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.batch_size="
                          f"{t.batch_size} x {world} processes: choose a batch_size and a number of processes "
                          "whose product divides it")
    steps = t.global_batch_size // per_micro_step
    if t.gradient_accumulation_steps not in (1, steps):
        raise ConfigError(f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} contradicts "
                          f"train.global_batch_size={t.global_batch_size} ({steps} on {world} processes): set one")
    return dataclasses.replace(config, train=dataclasses.replace(t, gradient_accumulation_steps=steps))
