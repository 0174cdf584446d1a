"""FSDP2: every transformer block, and the rest of the model, sharded over the ranks.

DDP keeps a whole copy of the weights, gradients and optimizer state on every rank. FSDP2
(torch.distributed.fsdp.fully_shard) cuts each parameter into row blocks, one per rank, held as a
DTensor: a rank all-gathers a block's weights just before the block runs, frees them after, and
reduce-scatters the gradients in backward, so it keeps, and steps, only its own rows of everything.
Memory per rank falls to about 1/N of DDP's, plus one block's gathered weights and the activations.

    fsdp_requested()            train.parallelism, or `auto` and an Accelerate FSDP config (ACCELERATE_USE_FSDP)
    check_fsdp()                what FSDP here cannot do, refused before any work with the key and the fix
    accelerate_env()            Accelerate must not see its FSDP config: see below
    activation_checkpointing()  train.activation_checkpointing, or the Accelerate config's fsdp_activation_checkpointing
    shard()                     torch.compile per block, then fully_shard per block and root
    sharding_report()           what is sharded and how much of it this rank holds, for run.json and the console

Why the model is sharded here and not by accelerator.prepare(): Accelerate drops its FSDP plugin when
the device is the CPU and wraps the model in DDP without a word, so the same config would be FSDP on
GPUs and DDP in CI. Sharding with fully_shard ourselves is one code path on GPUs and CPU processes
(gloo), and the tests check the parameters really are split. Accelerate still launches and joins the
processes (`accelerate launch --config_file configs/accelerate/fsdp.yaml`), places batches, runs
autocast, gathers metrics and logs; the optimizers still go through prepare().

Mixed precision is FSDP's policy: with train.mixed_precision=bf16 on CUDA the gathered weights are
bf16 and gradients are reduced in fp32; on a CPU everything stays fp32. Checkpoints are sharded too
(launch/checkpointing.py: torch.distributed.checkpoint, every rank writing its own rows).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from gpt.config import ConfigError, RunConfig

# what `accelerate launch` puts in the environment from an FSDP config
FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING",
            "FSDP_RESHARD_AFTER_FORWARD", "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_STATE_DICT_TYPE")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested(config: RunConfig) -> bool:
    """train.parallelism=fsdp, or auto under an Accelerate FSDP config."""
    p = config.train.parallelism
    return p == "fsdp" or (p == "auto" and _env_true("ACCELERATE_USE_FSDP"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_fsdp(config: RunConfig) -> None:
    """Refuse, before any work, what FSDP here cannot do, naming the key and the fix."""
    t = config.train
    if t.parallelism == "ddp" and _env_true("ACCELERATE_USE_FSDP"):
        raise ConfigError("train.parallelism=ddp under an Accelerate FSDP config: launch with "
                          "configs/accelerate/cpu_ddp.yaml or multi_gpu.yaml for DDP, or set train.parallelism=auto")
    if not fsdp_requested(config):
        return
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ConfigError(f"the Accelerate config asks for fsdp_version {version}: this trainer shards with FSDP2 "
                          "only (FSDP1 resumes with an empty optimizer state); set fsdp_version: 2")
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        raise ConfigError("the Accelerate config sets fsdp_offload_params: true, which this trainer does not do; "
                          "set it to false (and use train.activation_checkpointing=true to save memory)")
    if t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported with FSDP (its grad scaler does not shard): "
                          "use bf16")
    world = world_size()  # one process is allowed: it shards nothing, but resumes any sharded checkpoint
    m = config.model
    rows = m.embedding_dim  # the fewest rows of any weight: a norm's gain, or llama's k and v projections
    if m.arch == "llama":
        rows = min(rows, m.kv_heads * m.head_dim)
    if rows < world:
        raise ConfigError(f"the model is too small to shard over {world} processes: its smallest weight has {rows} "
                          "rows and each rank needs at least one (model.embedding_dim, model.num_kv_heads); "
                          "use fewer processes, or DDP")


@contextlib.contextmanager
def accelerate_env(fsdp: bool):
    """While the Accelerator is built, hide the FSDP config from it when this trainer shards: on a GPU
    it would otherwise expect to wrap the model itself in prepare()."""
    saved = {k: os.environ.pop(k) for k in FSDP_ENV if fsdp and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def activation_checkpointing(config: RunConfig) -> bool:
    """train.activation_checkpointing, or the Accelerate FSDP config's fsdp_activation_checkpointing."""
    return config.train.activation_checkpointing or (fsdp_requested(config)
                                                     and _env_true("FSDP_ACTIVATION_CHECKPOINTING"))


def shard(model, config: RunConfig, device: torch.device):
    """The model on `device`, each block compiled (train.compile) and then sharded, then the root (the
    embeddings, final norm and head). Every rank must call this with the same, identically initialised,
    model: each keeps its own rows and frees the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # A block returns its keys and values (views of one projection) beside its output; nothing changes
    # them in place, which is what FSDP2 warns about for every view a wrapped module returns.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if device.type == "cpu" and world_size() > 1:
        return_gathered_memory()
    model.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy()  # fp32 everywhere
    if device.type == "cuda" and config.train.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for block in model.blocks:
        if config.train.compile:
            block.compile()  # in place: the state dict keeps its plain keys
        # the last block's weights are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard and block is not model.blocks[-1])
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def return_gathered_memory() -> None:
    """On a CPU, each block's gathered weights and gradients are tens of MB, allocated and freed once
    per block per step. glibc's malloc keeps freed blocks under its (adaptive, up to 32 MB) mmap
    threshold in its heaps, one per thread that allocated (gloo's threads too), so a rank's memory grew
    by about one gathered block per block in the first step (GPT-2 large: past 11 GB a rank, where
    2 ranks x 6 GB is the state). Above a fixed 1 MiB, allocations get their own mappings and go back
    to the system when freed. Best effort: only where the C library is glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor (a parameter, its gradient or state under FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sharding_report(model) -> dict:
    """What is sharded, over how many ranks, and how much of it this rank holds."""
    seen, total, here, example = set(), 0, 0, None
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        here += local(p).numel()
        if example is None and name.startswith("blocks.") and p.dim() == 2:
            example = f"{name} {tuple(p.shape)} holds {tuple(local(p).shape)} here"
    return {"strategy": "FSDP2 (fully_shard: each block, then the root)", "world_size": world_size(),
            "parameters": total, "parameters_here": here, "example": example}


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: CUDA's allocator peak, or the peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
