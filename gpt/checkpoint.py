"""The checkpoint folder: what a training run leaves behind, and how to read it back.

    RUN_DIR/checkpoints/step-000250/
        model.safetensors   weights, plain keys (no DDP or torch.compile prefixes)
        config.json         the model config, vocab_size included
        tokenizer.json      the vocabulary
        run_config.json     the resolved training config
        meta.json           format version, step, losses
        optimizer.bin, random_states_*.pkl, ...   resumable state written by Accelerate's save_state
    RUN_DIR/checkpoints/latest   the name of the newest complete checkpoint

Weights are read with safetensors and metadata with json; nothing here unpickles. (Accelerate
reads its own state files with torch.load(weights_only=True).)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt.config import ModelConfig, model_config_from_dict
from gpt.model import GPT
from gpt.tokenizer import CharTokenizer

FORMAT = "gpt-checkpoint"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used. The message says what to do."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: the `latest` pointer, else the highest step."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "meta.json").is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run's out_dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (with meta.json) nor a run folder with checkpoints/: "
            "pass a run's out_dir or one of its checkpoints/step-NNNNNN folders"
        )
    return latest


def write_model_files(folder: Path, model: GPT, tokenizer: CharTokenizer, meta: dict, run_config: dict) -> None:
    """Write the self-describing part of a checkpoint (everything but the optimizer state)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps(model.config.__dict__, indent=2))
    tokenizer.save(folder / "tokenizer.json")
    (folder / "run_config.json").write_text(json.dumps(run_config, indent=2))
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **meta}, indent=2))


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} is format {meta.get('format')!r} version {meta.get('version')!r}; this build reads "
            f"{FORMAT!r} version {FORMAT_VERSION}: use the gpt version that wrote it"
        )
    return meta


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an earlier one")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path), device=str(device)))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[GPT, CharTokenizer, dict]:
    """(model in eval mode, tokenizer, meta) from a checkpoint folder or a run folder."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: the checkpoint is incomplete; use an earlier one")
    config: ModelConfig = model_config_from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = CharTokenizer.load(folder / "tokenizer.json")
    model = GPT(config).to(device)
    load_weights(model, folder)
    model.eval()
    return model, tokenizer, {**meta, "path": str(folder)}
