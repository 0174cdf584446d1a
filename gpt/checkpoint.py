"""The checkpoint folder: what a training run leaves behind, and how to read it back.

    RUN_DIR/checkpoints/step-000250/
        model.safetensors   weights, plain keys (no DDP or torch.compile prefixes)
        config.json         the model config, vocab_size included
        tokenizer.json      the tokenizer: a char vocabulary, or Hugging Face tokenizers' format for bpe
        run_config.json     the resolved training config
        meta.json           format version, step, losses, the corpus and tokenizer sha256, and the
                            size of every other file in the folder (written last)
        optimizer.bin, random_states_*.pkl, ...   resumable state written by Accelerate's save_state
    or, written by FSDP (launch/sharding.py), every rank its own rows of each tensor, as safetensors:
        model/, optimizer/  shard-RANK-model-FILE-of-N.safetensors, one file per block (and one for the
                            rest) per rank, in place of model.safetensors and optimizer.bin
                            (torch.distributed.checkpoint's safetensors format)
        rng-rank-NNNNN.safetensors   each rank's random number generator states
    RUN_DIR/checkpoints/latest   the name of the newest complete checkpoint
    RUN_DIR/checkpoints/best     the name of the one with the lowest validation loss (kept when pruning)

A checkpoint is complete when meta.json is there and every file it lists has the recorded size;
readers skip incomplete ones (a disk that lost the tail of a file, a folder copied in part).

Readers and writers both live here: resolve_checkpoint() and load_checkpoint() read, and
publish_checkpoint() writes (the model files and meta.json, the durable rename, the `latest` and
`best` pointers, pruning). What every training process does around it is launch/checkpointing.py.

Weights are read with safetensors and metadata with json; nothing here unpickles. (Accelerate
reads its own state files with torch.load(weights_only=True).)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from gpt.config import ModelConfig, model_config_from_dict
from gpt.files import publish_folder, save_safetensors, sha256_file, write_atomic
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, load_tokenizer, tokenizer_sha256

FORMAT = "gpt-checkpoint"
FORMAT_VERSION = 1
SHARDED_WEIGHTS = "model"  # a sharded checkpoint's folder of weights, in place of model.safetensors
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used. The message says what to do."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def missing_files(folder: Path) -> list[str]:
    """What keeps a checkpoint folder from being complete: absent files, or files of the wrong size."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return ["meta.json"]
    listed = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(listed, dict):  # written before sizes were recorded: the files a reader needs
        listed = {name: None for name in ("model.safetensors", "config.json", "tokenizer.json")}
    out = []
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            out.append(name)
        elif size is not None and path.stat().st_size != size:
            out.append(f"{name} ({path.stat().st_size} bytes, recorded {size})")
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (interrupted or damaged ones are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and not missing_files(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _pointed(run_dir: str | Path, pointer: str) -> Path | None:
    """The checkpoint a pointer file (checkpoints/latest or best) names, if it is there and complete."""
    root = Path(run_dir) / "checkpoints"
    if (root / pointer).is_file():
        target = root / (root / pointer).read_text().strip()
        if STEP_DIR.match(target.name) and target.is_dir() and not missing_files(target):
            return target
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: the `latest` pointer if it names a complete one,
    else the highest complete step."""
    return _pointed(run_dir, "latest") or (list_checkpoints(run_dir) or [None])[-1]


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss, as the `best` pointer names it."""
    return _pointed(run_dir, "best")


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """Accept a checkpoint folder, or a run's out_dir: its `latest` checkpoint, or its `best` (lowest
    validation loss; the latest if none was marked)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if which not in ("best", "latest"):
        raise CheckpointError(f"checkpoint {which!r} is unknown: use best or latest")
    if which == "best" and best_checkpoint(path) is not None:
        return best_checkpoint(path)
    latest = latest_checkpoint(path)
    if latest is None and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}/checkpoints holds no complete checkpoint: train longer, or resume the run")
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (with meta.json) nor a run folder with checkpoints/: "
            "pass a run's out_dir or one of its checkpoints/step-NNNNNN folders"
        )
    return latest


def write_model_files(folder: Path, model: GPT | ModelConfig, tokenizer: Tokenizer, meta: dict,
                      run_config: dict) -> None:
    """Write the self-describing part of a checkpoint, then meta.json listing every file below `folder`
    (the optimizer and RNG states included, so write those first) with its size. `model` is the model,
    whose weights go to model.safetensors, or only its config when the ranks have written their shards
    of the weights to model/ already (a sharded checkpoint)."""
    if isinstance(model, ModelConfig):
        config = model
    else:
        config = model.config
        save_safetensors(weights_to_save(model), folder / "model.safetensors", metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps(config.__dict__, indent=2))
    tokenizer.save(folder / "tokenizer.json")
    (folder / "run_config.json").write_text(json.dumps(run_config, indent=2))
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "meta.json"}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_sha256(tokenizer), **meta,
            "files": files}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def publish_checkpoint(tmp: Path, final: Path, model: GPT | ModelConfig, tokenizer: Tokenizer, meta: dict,
                       run_config: dict, keep: int) -> None:
    """Complete the checkpoint being built in `tmp` (which holds the resumable state already), publish it
    durably as `final` (RUN_DIR/checkpoints/step-NNNNNN), point `latest` at it, and `best` too if its
    validation loss, measured at this step, is the lowest yet; then keep the newest `keep` and the best."""
    write_model_files(tmp, model, tokenizer, meta, run_config)
    publish_folder(tmp, final, replace=True)  # fsync files and folders, then rename
    root, run_dir = final.parent, final.parent.parent
    write_atomic(root / "latest", final.name)
    best = best_checkpoint(run_dir)
    val_loss = meta.get("val_loss", math.inf)
    if meta.get("evaluated_at") == meta.get("step") and math.isfinite(val_loss) and (
            best is None or val_loss < read_meta(best).get("val_loss", math.inf)):
        write_atomic(root / "best", final.name)
        best = final
    prune_checkpoints(run_dir, keep, best)


def prune_checkpoints(run_dir: Path, keep: int, best: Path | None) -> None:
    """Delete all but the newest `keep` complete checkpoints, never the best, and what a crash between
    two renames left behind."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != best:  # the best validation loss is kept however old it is
            shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / "checkpoints").glob(".step-*.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_run_config(folder: Path) -> dict:
    """The resolved training config a checkpoint was written with (its run_config.json), as a dict."""
    path = Path(folder) / "run_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}): use another checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object: use another checkpoint")
    return config


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} is format {meta.get('format')!r} version {meta.get('version')!r}; this build reads "
            f"{FORMAT!r} version {FORMAT_VERSION}: use the gpt version that wrote it"
        )
    return meta


def weights_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict, on the CPU; a tied LM head is the token embedding, so it is stored once."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    return state


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    path = folder / "model.safetensors"
    if not path.is_file() and is_sharded_checkpoint(folder):
        return load_sharded_weights(model, folder)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an earlier one")
    device = next(model.parameters()).device
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    on_meta = device.type == "meta"  # built without memory: the file's tensors become the parameters
    state = load_file(str(path), device="cpu" if on_meta else str(device))
    missing, unexpected = model.load_state_dict(state, strict=not tied, assign=on_meta)
    if tied and (unexpected or set(missing) - {"lm_head.weight"}):
        raise CheckpointError(f"{path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                              "use the checkpoint's own config")
    if tied and on_meta:
        model.lm_head.weight = model.token_embedding.weight


def is_sharded_checkpoint(folder: Path) -> bool:
    """Written by FSDP: the weights are in model/, in every rank's shards."""
    return (Path(folder) / SHARDED_WEIGHTS).is_dir()


def weights_sha256(folder: Path, model: GPT) -> str:
    """The sha256 of the checkpoint's weights as model.safetensors holds them. A sharded checkpoint has
    no such file: the same bytes are made from its weights, so the same weights give the same hash."""
    if (folder / "model.safetensors").is_file():
        return sha256_file(folder / "model.safetensors")
    return hashlib.sha256(save(weights_to_save(model), metadata={"format": FORMAT})).hexdigest()


def load_sharded_weights(model: torch.nn.Module, folder: Path) -> None:
    """Weights from a sharded checkpoint (FSDP: each rank wrote its rows of every tensor to model/, as
    safetensors files whose headers say where the rows belong), stitched into whole tensors in this
    process by torch.distributed.checkpoint, which needs no process group for it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    device = next(model.parameters()).device
    on_meta = device.type == "meta"
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="cpu" if on_meta else device)
             for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}  # stored once
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": reading alone is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED_WEIGHTS)), no_dist=True)
    except Exception as e:  # DCP wraps what went wrong (a missing key, a torn file) in its own exception
        raise CheckpointError(f"{folder / SHARDED_WEIGHTS} cannot be read into the model ({str(e).splitlines()[0]}): "
                              "use the checkpoint's own config, or an earlier checkpoint") from None
    model.load_state_dict(state, strict=not tied, assign=on_meta)
    if tied:
        model.lm_head.weight = model.token_embedding.weight


def load_checkpoint(path: str | Path, device: str = "cpu", which: str = "latest") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, meta) from a checkpoint folder or a run folder (see resolve_checkpoint)."""
    folder = resolve_checkpoint(path, which)
    meta = read_meta(folder)
    missing = missing_files(folder)
    if missing:
        raise CheckpointError(f"{folder} is incomplete ({', '.join(missing[:3])}): use an earlier checkpoint")
    config: ModelConfig = model_config_from_dict(json.loads((folder / "config.json").read_text()))
    try:
        tokenizer = load_tokenizer(folder / "tokenizer.json")
    except ValueError as e:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: {e}; use an earlier checkpoint") from None
    with torch.device("meta"):  # no random initialisation to overwrite: the weights are read once, in place
        model = GPT(config)
    load_weights(model, folder)
    model.to(device)
    model.eval()
    return model, tokenizer, {**meta, "path": str(folder)}
