"""Where a run starts: from scratch, from a transformers GPT-2 or Llama folder (model.init_from=hf:PATH),
or from a run of ours (train.init_from=RUN_OR_CHECKPOINT: fine-tuning, e.g. on conversations).

    take_shape_from_hf / take_shape_from_run   the config's model shape and tokenizer from the source,
                                               before any work (setup() calls them)
    base_tokenizer                             the source's tokenizer, to which chat data adds its markers
    build_model                                the model: fresh and seeded, or the source's weights, its
                                               vocabulary grown for tokens added since
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from gpt.config import ConfigError, RunConfig
from gpt.model import GPT


def take_shape_from_hf(config: RunConfig) -> RunConfig:
    """model.init_from=hf:...: the model's shape and the tokenizer come from the transformers folder;
    the run config keeps its dropout and everything else (and, for a Llama, its block_size: the
    context it trains on, up to the folder's max_position_embeddings)."""
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
    block = shape.block_size
    if shape.arch == "llama":  # rotary positions have no table: train on the run's context, up to the model's
        if config.model.block_size > shape.block_size:
            raise ConfigError(f"model.block_size={config.model.block_size} exceeds the imported model's "
                              f"max_position_embeddings={shape.block_size}: lower it")
        block = config.model.block_size
    model = dataclasses.replace(shape, vocab_size=0, dropout=config.model.dropout, init_from=config.model.init_from,
                                block_size=block)
    data = dataclasses.replace(d, tokenizer="bpe", tokenizer_file=tokenizer_file)
    return dataclasses.replace(config, model=model, data=data)


def take_shape_from_run(config: RunConfig, resuming: Path | None = None) -> RunConfig:
    """train.init_from=RUN_OR_CHECKPOINT: fine-tune one of our own models. Its shape (and block_size:
    a gpt2's position table, a llama's context up to it) and tokenizer come from the checkpoint; the
    run config keeps its dropout and everything else. A run that resumes (from `resuming`, its own
    latest checkpoint) no longer needs the source: it may have been moved or deleted since."""
    from gpt.checkpoint import CheckpointError, missing_files, resolve_checkpoint
    from gpt.config import model_config_from_dict

    source = config.train.init_from
    if resuming is not None and not Path(source).exists():
        source = str(resuming)
    try:
        folder = resolve_checkpoint(source)
        if missing_files(folder):
            raise CheckpointError(f"{folder} is incomplete ({', '.join(missing_files(folder)[:3])})")
        shape = model_config_from_dict(json.loads((folder / "config.json").read_text()))
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        raise ConfigError(f"train.init_from={config.train.init_from}: {e}; name a run folder or a checkpoint of "
                          "ours (python -m launch writes them), or use model.init_from=hf:PATH for a transformers "
                          "folder") from None
    block = shape.block_size
    if shape.arch == "llama" and config.model.block_size < shape.block_size:
        block = config.model.block_size
    model = dataclasses.replace(shape, vocab_size=0, dropout=config.model.dropout, block_size=block)
    d = config.data
    if d.format == "text":
        tokenizer_file = str(folder / "tokenizer.json")
        if d.tokenizer == "bpe":  # the text is tokenized as the model was
            d = dataclasses.replace(d, tokenizer_file=tokenizer_file)
    train = dataclasses.replace(config.train, init_from=str(folder))
    return dataclasses.replace(config, model=model, data=d, train=train)


def base_tokenizer(config: RunConfig, start_from: Path | None = None):
    """The tokenizer of the model fine-tuned: the run's own checkpoint's when it resumes (the source
    may be gone by then), an init_from checkpoint's, an imported folder's, or None."""
    from gpt.tokenizer import load_tokenizer

    if start_from is not None:
        return load_tokenizer(start_from / "tokenizer.json")
    if config.train.init_from:
        return load_tokenizer(Path(config.train.init_from) / "tokenizer.json")
    if config.data.tokenizer_file:
        return load_tokenizer(config.data.tokenizer_file)
    return None


def build_model(config: RunConfig, model_config, start_from: Path | None, accelerator) -> tuple[GPT, dict | None]:
    """A fresh model, the same on every rank (seeded), or, fine-tuning, one with imported GPT-2 weights
    (and the check of that import against transformers, from the main process)."""
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    if start_from is not None or not (config.model.init_from or config.train.init_from):
        return GPT(model_config), None
    if config.train.init_from:
        from gpt.checkpoint import load_checkpoint

        model, tokenizer, meta = load_checkpoint(config.train.init_from)
        model.grow_vocabulary(model_config.vocab_size)  # a chat template's new tokens
        model.config = dataclasses.replace(model.config, dropout=model_config.dropout,
                                           block_size=model_config.block_size)
        set_dropout(model, model_config.dropout)
        model.train()
        return model, {"from": meta["path"], "parity": {"checked": False, "note": f"step {meta.get('step')} of "
                                                        f"that run, val loss {meta.get('val_loss', 'unknown')}"}}
    from gpt.hf import import_hf, parity_with_transformers, resolve_folder

    folder = resolve_folder(config.model.init_from)
    own = read_hf_vocab(folder)
    model = import_hf(folder, dataclasses.replace(model_config, vocab_size=own))
    parity = parity_with_transformers(model, folder) if accelerator.is_main_process else {"checked": False}
    model.grow_vocabulary(model_config.vocab_size)
    model.train()
    return model, {"from": str(folder), "parity": parity}


def read_hf_vocab(folder: Path) -> int:
    from gpt.hf import read_config

    return read_config(folder).vocab_size


def set_dropout(model: GPT, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
