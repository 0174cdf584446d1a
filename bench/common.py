"""What the benchmarks share: a random-weight checkpoint and export of a given size, and a line
saying what machine and libraries a run measured (printed by each benchmark, never written by hand)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # TinyShakespeare's 65 characters


def add_shape_arguments(parser, layers: int = 8, heads: int = 8, dim: int = 512, block: int = 256) -> None:
    """--layers, --heads, --dim, --block: the random model's shape (default: seed size)."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--block", type=int, default=block)


def random_checkpoint(folder: Path, layers: int, heads: int, dim: int, block: int):
    """A checkpoint folder with seeded random weights: (folder, model, tokenizer)."""
    import torch

    from gpt.checkpoint import write_model_files
    from gpt.config import ModelConfig, RunConfig
    from gpt.model import GPT
    from gpt.tokenizer import CharTokenizer

    config = ModelConfig(block_size=block, embedding_dim=dim, num_heads=heads, num_layers=layers,
                         vocab_size=len(VOCAB))
    torch.manual_seed(0)
    model, tokenizer = GPT(config).eval(), CharTokenizer(VOCAB)
    run = RunConfig()
    run.model = config
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(folder, model, tokenizer, {"step": 0}, run.to_dict())
    return folder, model, tokenizer


def make_export(folder: Path, layers: int, heads: int, dim: int, block: int, **options) -> Path:
    """That checkpoint exported (and verified) to folder/seed."""
    from export.pipeline import export

    checkpoint, _, _ = random_checkpoint(folder / "checkpoint", layers, heads, dim, block)
    export(checkpoint, folder / "seed", log=lambda s: None, **options)
    return folder / "seed"


def machine() -> str:
    """The CPU (model, cores, the vector instructions that matter here) and the library versions."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    versions = []
    for module in ("torch", "onnxruntime", "tokenizers"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            continue
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{name}, {cores} cores ({', '.join(isa) or 'no AVX2'}); python {platform.python_version()}, "
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
            time.sleep(0.1)
    return False
