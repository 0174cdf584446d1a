"""Saving and restoring a checkpoint from every training process.

gpt/checkpoint.py owns the format: what a checkpoint folder holds, how it is published and pointed
to, and which are pruned. This module is the collective part around it: every rank checks its
weights, saves its own state (optimizer, RNG) into one staging folder, and waits for the others;
then the main process publishes; a failure is raised on every rank.
"""

from __future__ import annotations

import contextlib
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


def save_checkpoint(accelerator, model, corpus: TokenizedCorpus, config: RunConfig, step: int, meta: dict) -> Path:
    """Write checkpoints/step-NNNNNN so that it is published whole or not at all.

    Every process takes part: all check that the weights are finite, all save their state (each its
    own RNG file) into one staging folder, and all wait until every one has finished. Only then does
    the main process check that each rank's file is there and publish the checkpoint
    (gpt.checkpoint.publish_checkpoint: model files, meta.json, durable rename, `latest` and `best`,
    pruning). A failure is raised on every rank.
    """
    out_dir = Path(config.train.out_dir)
    final = out_dir / "checkpoints" / checkpoint_name(step)
    check_finite(accelerator, model, step, out_dir)
    main = accelerator.is_main_process
    with staging(final, tag="save", owner=main) as tmp:  # the same folder for every rank
        accelerator.wait_for_everyone()  # the main process has made it
        with one_scaler_writer(accelerator):
            accelerator.save_state(str(tmp))  # optimizer, RNG states, grad scaler; weights via the hook below
        accelerator.wait_for_everyone()  # save_state ends without a barrier; a slow rank may still be writing
        problem = missing_rank_states(accelerator, tmp, final) if main else ""
        if main and not problem:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            publish_checkpoint(tmp, final, unwrapped, corpus.tokenizer,
                               {"step": step, "corpus_sha256": corpus.sha256, **meta}, config.to_dict(),
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
        bad += (~torch.isfinite(p.detach())).sum()
    bad = int(accelerator.reduce(bad, reduction="sum").item())
    if bad:
        raise TrainingError(
            f"{bad} weights became inf/NaN at step {step}: training diverged and this checkpoint is not saved; "
            f"the last good checkpoint is {latest_checkpoint(out_dir) or 'none'}; resume from it with a lower "
            "train.learning_rate or a train.grad_clip"
        )


def missing_rank_states(accelerator, tmp: Path, final: Path) -> str:
    """Every rank's RNG file must be in the staging folder; a rank that wrote elsewhere (a machine
    without the shared storage) would make a checkpoint that cannot resume."""
    from accelerate.utils import RNG_STATE_NAME

    missing = [f"{RNG_STATE_NAME}_{r}.pkl" for r in range(accelerator.num_processes)
               if not (tmp / f"{RNG_STATE_NAME}_{r}.pkl").is_file()]
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
