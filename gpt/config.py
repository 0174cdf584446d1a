"""Typed, validated configuration: one dataclass per concern.

A run is described by a YAML file with three sections, `model`, `data` and `train`, each mapping
onto a dataclass below. Dotted overrides such as `--train.learning_rate=1e-3` are applied on top.
Every problem (unknown key, wrong type, impossible value) is collected and reported on one line
that names the key and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt.datasets import DATASETS
from gpt.typed import RawOverride, build


class ConfigError(ValueError):
    """A configuration that cannot be run. The message names each bad key and how to fix it."""


ARCHS = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """Shape of the transformer. `vocab_size` is not set by hand: it comes from the tokenizer.

    `arch` picks the family: gpt2 (the tutorial's: learned positions, LayerNorm, GELU, biases) or
    llama (rotary positions, RMSNorm, a SwiGLU MLP, grouped-query attention, no biases)."""

    arch: str = "gpt2"  # gpt2 | llama
    block_size: int = 256  # longest context the model attends over (positions 0..block_size-1)
    embedding_dim: int = 512  # width of the residual stream, C
    num_heads: int = 8  # attention heads; each has head_dim = embedding_dim // num_heads
    num_layers: int = 8  # transformer blocks
    dropout: float = 0.0
    bias: bool | None = None  # biases in Linear and LayerNorm layers; default: gpt2 yes, llama no
    vocab_size: int = 0  # filled in from the tokenizer
    tie_embeddings: bool = False  # the LM head reuses the token embedding matrix (as GPT-2 does)
    init_from: str | None = None  # hf:PATH_OR_NAME: start from a transformers GPT-2 or Llama (its shape replaces these)
    # llama only:
    num_kv_heads: int | None = None  # heads of keys and values (grouped-query attention); default num_heads, 1 = MQA
    intermediate_size: int | None = None  # SwiGLU's hidden width; default 8C/3 rounded up to a multiple of 64
    rope_theta: float = 10000.0  # base of the rotary embedding's frequencies
    norm_eps: float = 1e-5  # epsilon of RMSNorm (llama) and LayerNorm (gpt2: GPT-2's 1e-5)

    def __post_init__(self):
        if self.bias is None:  # the family's own default
            self.bias = self.arch != "llama"

    def problems(self) -> list[str]:
        out = []
        if self.arch not in ARCHS:
            out.append(f"model.arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        if self.init_from is not None and not (self.init_from.startswith("hf:") and len(self.init_from) > 3):
            out.append(f"model.init_from={self.init_from!r} must be hf:PATH (a transformers GPT-2 or Llama folder) or "
                       "hf:NAME (a Hub model, e.g. hf:gpt2)")
        for name in ("block_size", "embedding_dim", "num_heads", "num_layers"):
            if getattr(self, name) < 1:
                out.append(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads >= 1 and self.embedding_dim % self.num_heads:
            out.append(f"model.embedding_dim={self.embedding_dim} is not divisible by model.num_heads="
                       f"{self.num_heads}: pick an embedding_dim that is a multiple of num_heads")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.vocab_size < 0 or self.vocab_size > 1 << 20:
            out.append(f"model.vocab_size={self.vocab_size} must be in [1, 1048576]")
        if self.norm_eps <= 0:
            out.append(f"model.norm_eps={self.norm_eps} must be > 0, e.g. 1e-5")
        return out + (self._llama_problems() if self.arch == "llama" else self._gpt2_problems())

    def _llama_problems(self) -> list[str]:
        out, kv = [], self.kv_heads
        if kv < 1 or (self.num_heads >= 1 and self.num_heads % kv):
            out.append(f"model.num_kv_heads={kv} must divide model.num_heads={self.num_heads} (each key/value head "
                       "serves num_heads / num_kv_heads query heads; 1 = multi-query)")
        if self.num_heads >= 1 and self.embedding_dim % self.num_heads == 0 and self.head_dim % 2:
            out.append(f"model.embedding_dim / model.num_heads = {self.head_dim} is odd: rotary embeddings turn pairs "
                       "of a head's dimensions, so pick an even head_dim")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            out.append(f"model.intermediate_size={self.intermediate_size} must be >= 1 (or null for 8C/3)")
        return out + ([f"model.rope_theta={self.rope_theta} must be > 0, e.g. 10000"] if self.rope_theta <= 0 else [])

    def _gpt2_problems(self) -> list[str]:
        return [f"model.{name} ({what}) is llama's: set model.arch=llama, or remove it" for name, what in (
            ("num_kv_heads", "grouped-query attention"), ("intermediate_size", "SwiGLU's width"))
            if getattr(self, name) is not None]

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Heads of keys and values: num_heads (gpt2, and llama by default) or fewer (grouped-query)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width: gpt2 4C; llama intermediate_size, by default 8C/3 rounded up to a
        multiple of 64 (three matrices of C x 8C/3 hold as many weights as gpt2's two of C x 4C)."""
        if self.arch != "llama":
            return 4 * self.embedding_dim
        return self.intermediate_size or -(-8 * self.embedding_dim // 3 // 64) * 64


@dataclass
class DataConfig:
    """Where the text comes from, how it becomes tokens, and how it is split."""

    dataset: str | None = "tinyshakespeare"  # a known corpus, downloaded and verified if missing; null: none
    path: str | None = None  # or your own: a file, a folder or a glob of .txt, .md, .jsonl(.gz/.zst), .parquet,
    # .arrow (a save_to_disk folder), or hf:NAME[:SPLIT] for a Hugging Face dataset
    val_fraction: float = 0.1  # held out: whole documents chosen by a hash of their names (one text: its tail)
    tokenizer: str = "char"  # char (one token per character, the tutorial's) | bpe (byte-level BPE)
    vocab_size: int = 8192  # bpe: tokens to learn from the training split (256 bytes and <|endoftext|> included)
    tokenizer_file: str | None = None  # bpe: use this tokenizer.json (e.g. GPT-2's) instead of learning one
    tokenizer_sample_mb: int = 256  # bpe: learn from at most this much of the training split
    skip_bad_files: bool = False  # leave out (and count) files that are not UTF-8 or damaged, and bad .jsonl lines
    text_field: str = "text"  # the key (.jsonl) or column (.parquet, .arrow) that holds a document's text
    format: str = "text"  # text (pretraining) | chat (conversations for fine-tuning: gpt/sft.py)
    chat_template: str | None = None  # chat: a Jinja template file; default the model's own, else ChatML

    def problems(self) -> list[str]:
        out = []
        if self.path is None and self.dataset is None:
            out.append("data.path is required (this config names no dataset): --data.path=FOLDER, a file or a glob")
        elif self.path is None and self.dataset not in DATASETS:
            out.append(
                f"data.dataset={self.dataset!r} is unknown: use one of {sorted(DATASETS)} "
                "or set data.path to your own text"
            )
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"data.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.1")
        if self.tokenizer not in ("char", "bpe"):
            out.append(f"data.tokenizer={self.tokenizer!r} must be char or bpe")
        if not 260 <= self.vocab_size <= 1 << 20:
            out.append(f"data.vocab_size={self.vocab_size} must be in [260, 1048576] (256 bytes, <|endoftext|> "
                       "and some merges), e.g. 8192")
        if self.tokenizer_file is not None and self.tokenizer != "bpe":
            out.append("data.tokenizer_file is for data.tokenizer=bpe: set that too, or drop the file")
        if self.tokenizer_sample_mb < 1:
            out.append(f"data.tokenizer_sample_mb={self.tokenizer_sample_mb} must be >= 1")
        if self.format not in ("text", "chat"):
            out.append(f"data.format={self.format!r} must be text (documents) or chat (conversations)")
        if self.format == "chat" and self.path is None:
            out.append("data.path is required for data.format=chat: .jsonl files of {\"messages\": [...]} "
                       "conversations, e.g. --data.path=chat.jsonl")
        if self.chat_template is not None and self.format != "chat":
            out.append("data.chat_template is for data.format=chat: set that too, or drop the template")
        if not isinstance(self.text_field, str) or not self.text_field:
            out.append(f"data.text_field={self.text_field!r} must name the key or column that holds the text")
        return out


OPTIMIZERS = ("adamw", "muon")
PARALLELISMS = ("auto", "ddp", "fsdp")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "csv")
# keys of earlier versions, and what to write instead
RENAMED = {("train", "tensorboard"): "use train.log_with=tensorboard (or none, wandb, mlflow, csv)"}


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and the machine it runs on."""

    batch_size: int = 128  # sequences per process per micro-step
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # sequences per optimizer step over all ranks; sets the accumulation
    max_iters: int = 3000  # optimizer steps
    learning_rate: float = 3.0e-4  # peak, reached after warmup
    min_lr: float | None = None  # floor of the cosine decay; default learning_rate / 10
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # cosine decays until here; default max_iters
    weight_decay: float = 0.1  # applied to matrices, embeddings included (not biases or LayerNorm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_interval: int = 250
    eval_iters: int = 50  # batches per split per process averaged by validate()
    log_interval: int = 10
    checkpoint_interval: int = 250
    keep_checkpoints: int = 3  # newest K checkpoints are kept
    out_dir: str = "runs/shakespeare_char"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "no"  # no | bf16 | fp16, passed to Accelerate
    compile: bool = False  # torch.compile the model
    parallelism: str = "auto"  # auto | ddp | fsdp: how several processes share the work (launch/sharding.py);
    # auto is fsdp under an Accelerate FSDP config (configs/accelerate/fsdp.yaml), else ddp
    activation_checkpointing: bool = False  # keep only each block's input; backward recomputes the rest (less memory)
    threads: int = 0  # torch threads per process on CPU; 0 = cores / local processes
    dist_timeout_s: int = 300  # a rank stuck in a collective this long ends the job
    optimizer: str = "adamw"  # adamw (nanoGPT's) | muon (the blocks' matrices; AdamW for the rest): launch/optim.py
    muon_momentum: float = 0.95  # muon: momentum of the orthogonalised (Nesterov) update
    embedding_lr: float | None = None  # muon: AdamW's peak lr for embeddings and head; default learning_rate
    embedding_weight_decay: float | None = None  # muon: AdamW's decay for embeddings and head; default weight_decay
    scalar_lr: float | None = None  # muon: AdamW's peak lr for LayerNorm gains and biases (never decayed)
    log_with: str = "none"  # none | tensorboard | wandb | mlflow | csv: also log to this tracker (Accelerate's)
    init_from: str | None = None  # a run folder or checkpoint of ours: start from its weights (fine-tuning)

    def problems(self) -> list[str]:
        out = []
        positive = ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                    "eval_iters", "log_interval", "checkpoint_interval", "keep_checkpoints",
                    "dist_timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                out.append(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            out.append(f"train.global_batch_size={self.global_batch_size} must be >= 1")
        for name in ("warmup_iters", "threads"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate={self.learning_rate} must be > 0, e.g. 3e-4")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            out.append(f"train.min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= self.warmup_iters:
            out.append(f"train.lr_decay_iters={self.lr_decay_iters} must exceed warmup_iters={self.warmup_iters}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"train.optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.muon_momentum < 1:
            out.append(f"train.muon_momentum={self.muon_momentum} must be in [0, 1)")
        for name in ("embedding_lr", "scalar_lr", "embedding_weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                out.append(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.parallelism not in PARALLELISMS:
            out.append(f"train.parallelism={self.parallelism!r} must be one of {', '.join(PARALLELISMS)}")
        if self.log_with not in TRACKERS:
            out.append(f"train.log_with={self.log_with!r} must be one of {', '.join(TRACKERS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"train.device={self.device!r} must be one of auto, cpu, cuda")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            out.append(f"train.mixed_precision={self.mixed_precision!r} must be one of no, bf16, fp16")
        if not self.out_dir:
            out.append("train.out_dir is empty: name a folder for checkpoints and logs")
        if not 0 <= self.seed < 2**32:  # numpy's legacy seeding, which Accelerate's set_seed calls, takes 32 bits
            out.append(f"train.seed={self.seed} must be in [0, 2**32 - 1]")
        return out

    @property
    def resolved_min_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_lr_decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass
class RunConfig:
    """Everything a training run needs: the three sections of a config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def problems(self) -> list[str]:
        out = self.model.problems() + self.data.problems() + self.train.problems()
        if self.train.init_from and self.model.init_from:
            out.append("train.init_from and model.init_from both name a model to start from: keep one")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `--train.lr=3e-4` style flags into {"train": {"lr": 3e-4}}; values are parsed as YAML."""
    out: dict[str, dict[str, Any]] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r} is not of the form --section.key=value, e.g. --train.max_iters=100")
        key, raw = arg[2:].split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = RawOverride(raw)
    return out


def run_config_from_dict(data: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem on one line."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError("config file must be a mapping with sections model, data, train")
    merged: dict[str, dict[str, Any]] = {}
    for source in (data, overrides or {}):
        for section, values in source.items():
            if section not in SECTIONS:
                close = difflib.get_close_matches(str(section), list(SECTIONS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else " (sections are model, data, train)"
                problems.append(f"unknown section {section!r}{hint}")
                continue
            if not isinstance(values, dict):
                problems.append(f"section {section!r} must be a mapping of key: value")
                continue
            merged.setdefault(section, {}).update(values)
    if "vocab_size" in merged.get("model", {}):
        problems.append("model.vocab_size comes from the tokenizer: remove it from the config")
        del merged["model"]["vocab_size"]
    parts = {name: build(cls, merged.get(name, {}), name, problems, RENAMED) for name, cls in SECTIONS.items()}
    config = RunConfig(**parts)
    problems += config.problems()
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return config


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (never executed: `yaml.safe_load`) and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a YAML file such as "
                          "configs/shakespeare_char_cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return run_config_from_dict(data, parse_overrides(overrides or []))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Read a saved model config (checkpoint or export manifest)."""
    problems: list[str] = []
    config = build(ModelConfig, data, "model", problems)
    problems += config.problems()
    if config.vocab_size < 1:
        problems.append("model.vocab_size is missing from the saved config")
    if problems:
        raise ConfigError("invalid saved model config: " + "; ".join(problems))
    return config
