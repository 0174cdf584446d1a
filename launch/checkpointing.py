"""Saving and restoring a checkpoint from every training process.

gpt/checkpoint.py owns the format: what a checkpoint folder holds, how it is published and pointed
to, and which are pruned. This module is the collective part around it: every rank checks its
weights, saves its own state (optimizer, RNG) into one staging folder, and waits for the others;
then the main process publishes; a failure is raised on every rank.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from gpt.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_weights,
    publish_checkpoint,
    read_meta,
)
from gpt.config import RunConfig
from gpt.data import TokenizedCorpus
from gpt.files import staging
from gpt.tokenizer import tokenizer_sha256
from launch import TrainingError
from launch.sharding import local


def save_checkpoint(accelerator, model, optimizers: list, corpus: TokenizedCorpus, config: RunConfig, step: int,
                    meta: dict) -> Path:
    """Write checkpoints/step-NNNNNN so that it is published whole or not at all.

    Every process takes part: all check that the weights are finite, all save their state (each its
    own RNG file; under FSDP also its own rows of the weights and optimizer state) into one staging
    folder, and all wait until every one has finished. Only then does the main process check that
    each rank's files are there and publish the checkpoint (gpt.checkpoint.publish_checkpoint: model
    files, meta.json, durable rename, `latest` and `best`, pruning). A failure is raised on every rank,
    and a rank that dies mid-save leaves the previous checkpoint as `latest`.
    """
    out_dir = Path(config.train.out_dir)
    final = out_dir / "checkpoints" / checkpoint_name(step)
    check_finite(accelerator, model, step, out_dir)
    main = accelerator.is_main_process
    sharded = is_sharded(model)
    with staging(final, tag="save", owner=main) as tmp:  # the same folder for every rank
        accelerator.wait_for_everyone()  # the main process has made it
        if sharded:
            save_sharded_state(accelerator, model, optimizers, tmp)
        else:
            with one_scaler_writer(accelerator):
                accelerator.save_state(str(tmp))  # optimizer, RNG states, grad scaler; weights via the hook below
        accelerator.wait_for_everyone()  # save_state ends without a barrier; a slow rank may still be writing
        problem = missing_rank_states(accelerator, tmp, final, sharded) if main else ""
        if main and not problem:
            unwrapped = model.config if sharded else accelerator.unwrap_model(model, keep_torch_compile=False)
            extra = {"sharded": {"world_size": accelerator.num_processes}} if sharded else {}
            publish_checkpoint(tmp, final, unwrapped, corpus.tokenizer,
                               {"step": step, "corpus_sha256": corpus.sha256, **extra, **meta}, config.to_dict(),
                               keep=config.train.keep_checkpoints)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise TrainingError(problem)
    return final


def check_finite(accelerator, model, step: int, out_dir: Path) -> None:
    """The loss check before a save sees the loss before the last optimizer step; the step itself can
    still overflow. A collective count, so every rank takes the same branch."""
    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        bad += (~torch.isfinite(local(p.detach()))).sum()  # under FSDP each rank counts its own rows
    bad = int(accelerator.reduce(bad, reduction="sum").item())
    if bad:
        raise TrainingError(
            f"{bad} weights became inf/NaN at step {step}: training diverged and this checkpoint is not saved; "
            f"the last good checkpoint is {latest_checkpoint(out_dir) or 'none'}; resume from it with a lower "
            "train.learning_rate or a train.grad_clip"
        )


def missing_rank_states(accelerator, tmp: Path, final: Path, sharded: bool = False) -> str:
    """Every rank's RNG file must be in the staging folder; a rank that wrote elsewhere (a machine
    without the shared storage) would make a checkpoint that cannot resume."""
    from accelerate.utils import RNG_STATE_NAME

    names = [rng_file(r) if sharded else f"{RNG_STATE_NAME}_{r}.pkl" for r in range(accelerator.num_processes)]
    missing = [name for name in names if not (tmp / name).is_file()]
    if missing:
        return (f"checkpoint {final.name} lacks {', '.join(missing)} after every rank saved: on several machines "
                "train.out_dir must be on storage they all share; the checkpoint is not published")
    return ""


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


def register_hooks(accelerator) -> None:
    """Accelerate's save_state and load_state handle the optimizer and RNG states; the weights go
    through the checkpoint's own model.safetensors, with plain keys."""
    accelerator.register_save_state_pre_hook(_skip_weights_in_save_state)
    accelerator.register_load_state_pre_hook(_load_weights_for_load_state)


def _skip_weights_in_save_state(models, weights, output_dir) -> None:
    weights.clear()  # the checkpoint's model.safetensors is written with plain keys by write_model_files


def _load_weights_for_load_state(models, input_dir) -> None:
    from accelerate.utils import extract_model_from_parallel

    for model in models:
        load_weights(extract_model_from_parallel(model, keep_torch_compile=False), Path(input_dir))
    models.clear()  # already loaded; Accelerate restores the optimizer and RNG states


# --- sharded checkpoints (FSDP, launch/sharding.py) -------------------------------------------------
#
# torch.distributed.checkpoint (DCP) writes every rank's own rows, in parallel, and reads them back
# onto any number of ranks: each rank asks for the rows it now holds, wherever they were written.
# The storage is DCP's safetensors format: in model/ and optimizer/ a file per block per rank, each tensor's
# place in the whole recorded as JSON in the file's header. Nothing is pickled, and no rank ever holds
# the whole state. Hyperparameters (learning rates, betas) are not saved: they come from the config.

def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank:05d}.safetensors"


def _state_dicts(model, optimizers: list) -> tuple[dict, dict]:
    """The model's and the optimizers' state, flat ({"state.blocks.0.attn.qkv.weight.exp_avg": DTensor, ...}),
    keyed by parameter name; building it gives a fresh optimizer its state (zeros) to load into."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    weights, optim = get_state_dict(model, _unwrapped(optimizers), options=flat)
    if model.config.tie_embeddings:  # one tensor under two names: stored (and read back) once
        weights.pop("lm_head.weight", None)
    return weights, optim


def _unwrapped(optimizers: list) -> list:
    return [getattr(o, "optimizer", o) for o in optimizers]  # Accelerate's wrappers hold the torch optimizers


def _tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_sharded_state(accelerator, model, optimizers: list, folder: Path) -> None:
    """Every rank writes its rows of the weights and the optimizer state, and its RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from gpt.checkpoint import SHARDED_WEIGHTS
    from gpt.files import save_safetensors

    weights, optim = _state_dicts(model, optimizers)
    for name, state in ((SHARDED_WEIGHTS, weights), ("optimizer", _tensors(optim))):
        writer = HuggingFaceStorageWriter(str(folder / name), save_distributed=True,
                                          fqn_to_index_mapping=file_per_block(state, len(model.blocks)))
        dcp.save(state, storage_writer=writer)
    rng = {"cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    save_safetensors(rng, folder / rng_file(accelerator.process_index))


def file_per_block(state: dict, num_layers: int) -> dict[str, int]:
    """Which file of a rank's shards each tensor goes to: one per block, and one for the rest. The writer
    builds each file in memory before writing it, so a rank holds one block's share at a time beside
    its state, not a second copy of all of it."""
    def index(key: str) -> int:
        match = re.search(r"(?:^|\.)blocks\.(\d+)\.", key)
        return int(match.group(1)) + 1 if match else num_layers + 1

    return {key: index(key) for key in state}


def load_sharded_state(accelerator, model, optimizers: list, folder: Path) -> None:
    """Each rank reads the rows it holds now, from however many ranks wrote them; the RNG states only
    when the number of ranks is the one that saved (else each rank keeps its fresh seed)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from gpt.checkpoint import SHARDED_WEIGHTS

    weights, optim = _state_dicts(model, optimizers)
    tensors = _tensors(optim)
    try:
        for name, state in ((SHARDED_WEIGHTS, weights), ("optimizer", tensors)):
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder / name)))
    except Exception as e:  # DCP reports a missing key or a torn file as its own exception, per rank
        raise TrainingError(f"cannot resume from {folder}: its sharded state does not fit this run "
                            f"({str(e).strip().splitlines()[-1][:300]}); resume with the run's own "
                            "train.optimizer, or start a new run from its weights with --train.init_from") from None
    optim.update(tensors)
    set_state_dict(model, _unwrapped(optimizers), model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(flatten_optimizer_state_dict=True, strict=not model.config.tie_embeddings))
    path = folder / rng_file(accelerator.process_index)
    if path.is_file() and read_meta(folder).get("sharded", {}).get("world_size") == accelerator.num_processes:
        rng = load_file(str(path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
