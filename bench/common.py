"""What the benchmarks share: a random-weight checkpoint and export of a given size, and a line
saying what machine and libraries a run measured (printed by each benchmark, never written by hand)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # TinyShakespeare's 65 characters


def add_shape_arguments(parser, layers: int = 8, heads: int = 8, dim: int = 512, block: int = 256) -> None:
    """--layers, --heads, --dim, --block: the random model's shape (default: seed size); --arch and the
    llama's options (see family())."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--block", type=int, default=block)
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default --heads)")
    parser.add_argument("--intermediate", type=int, default=None, help="llama: SwiGLU width (default 8C/3)")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="llama: the rotary base")


def family(args) -> dict:
    """The ModelConfig fields of --arch and its options, for random_checkpoint (SmolLM2-135M's shape:
    --arch llama --layers 30 --heads 9 --kv-heads 3 --dim 576 --intermediate 1536 --rope-theta 100000
    --vocab 49152)."""
    if args.arch != "llama":
        return {}
    return {"arch": "llama", "num_kv_heads": args.kv_heads, "intermediate_size": args.intermediate,
            "rope_theta": args.rope_theta}


def random_checkpoint(folder: Path, layers: int, heads: int, dim: int, block: int, vocab: int | None = None,
                      **family):
    """A checkpoint folder with seeded random weights: (folder, model, tokenizer). With `vocab`, a GPT-2
    shape: byte-level BPE of that many tokens learned from TinyShakespeare, tied head, biases. `family`:
    more ModelConfig fields, e.g. arch="llama", num_kv_heads=3, intermediate_size=1536."""
    import torch

    from gpt.checkpoint import write_model_files
    from gpt.config import DataConfig, ModelConfig, RunConfig
    from gpt.model import GPT
    from gpt.tokenizer import CharTokenizer

    run = RunConfig()
    if vocab is None:
        tokenizer = CharTokenizer(VOCAB)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = bench_bpe(vocab)
        tokenizer.save(folder.parent / "bench_tokenizer.json")
        run.data = DataConfig(tokenizer="bpe", vocab_size=vocab,
                              tokenizer_file=str((folder.parent / "bench_tokenizer.json").resolve()))
    config = ModelConfig(block_size=block, embedding_dim=dim, num_heads=heads, num_layers=layers,
                         vocab_size=tokenizer.vocab_size, tie_embeddings=vocab is not None, **family)
    torch.manual_seed(0)
    model = GPT(config).eval()
    run.model = config
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(folder, model, tokenizer, {"step": 0}, run.to_dict())
    return folder, model, tokenizer


def bench_bpe(vocab: int):
    """A byte-level BPE of exactly `vocab` tokens from TinyShakespeare. Its merges may cross word
    boundaries (no pre-tokenizing regex): 1 MB of text has too few distinct words to fill GPT-2's
    50,257 tokens otherwise. For benchmarks of size, not of language."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gpt.config import DataConfig
    from gpt.datasets import resolve_corpus
    from gpt.tokenizer import EOT, BPETokenizer

    text = resolve_corpus(DataConfig()).read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"the benchmark tokenizer reached {tok.get_vocab_size()} tokens, not {vocab}")
    return BPETokenizer(tok)


def make_export(folder: Path, layers: int, heads: int, dim: int, block: int, family: dict | None = None,
                vocab: int | None = None, **options) -> Path:
    """That checkpoint (of `family`'s architecture, see family(); `vocab`: random_checkpoint's) in
    folder/checkpoint, exported (and verified) to folder/seed."""
    from export.pipeline import export

    checkpoint, _, _ = random_checkpoint(folder / "checkpoint", layers, heads, dim, block, vocab=vocab,
                                         **(family or {}))
    export(checkpoint, folder / "seed", log=lambda s: None, **options)
    return folder / "seed"


SETTLE_S = 0.2


def settle() -> None:
    """Wait for the engine measured last to go idle before the next is measured. Its threads spin on
    after its last call (onnxruntime's intra-op workers for tens of milliseconds), holding a core: the
    seed-size fused int4 graph measured right after another onnxruntime session decoded at a median of
    907 tokens/s, and 1005 after 0.2 s (8 interleaved pairs). A user runs one engine, which never
    follows another: each measurement should not either."""
    import time

    time.sleep(SETTLE_S)


def machine() -> str:
    """The CPU (model, cores, the vector instructions that native kernels choose by, AMX included) and
    the library versions."""
    from bench.engines import isa_line

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("torch", "onnxruntime", "tokenizers", "llama-cpp-python"):  # not imported: llama.cpp loads
        try:                                                                    # in a child first (bench.engines)
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{name}, {cores} cores (CPU flags: {isa_line()}); python {platform.python_version()}, "
            f"{', '.join(versions)}")


def wait_healthy(url: str, seconds: float = 60.0) -> bool:
    """Poll the server's /health until it answers 200; False if it has not within `seconds`."""
    import time

    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.1)  # not up, or up and loading (503)
    return False
