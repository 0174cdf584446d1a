"""Shared test setup: one torch thread, the shared TinyShakespeare copy, a fresh token cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One thread per process: tests run beside each other and beside subprocesses on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Use the shared corpus when it is there (CI and developer machines); else the loader's own
# resolution applies (the user cache, or a download on a machine with internet).
_shared = ROOT.parent / "shared" / "data"
if "GPT_DATA_DIR" not in os.environ and (_shared / "tinyshakespeare" / "input.txt").is_file():
    os.environ["GPT_DATA_DIR"] = str(_shared)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """A token cache of this session's own, so tests never read a stale one."""
    if "GPT_TEST_KEEP_CACHE" not in os.environ:
        os.environ["GPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("gpt-cache"))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def fresh_accelerate():
    """Training in-process creates an Accelerator; reset its singleton state around each test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


TINY = ROOT / "configs" / "tiny.yaml"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(cuda: bool = False, **extra: str) -> dict[str, str]:
    """Environment for a child process: this repo importable, one thread, the same data and cache,
    and no GPU unless asked for (so the suite gives the same results on a GPU machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


BPE = ["--data.tokenizer=bpe", "--data.vocab_size=512"]  # the tiny config with a byte-level BPE tokenizer


def command(*args: str) -> None:
    """Run `python -m ...` as a user would; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A tiny model trained for 40 steps by the real command line."""
    out = tmp_path_factory.mktemp("run")
    command("launch", str(TINY), f"--train.out_dir={out}", "--train.max_iters=40")
    return out


@pytest.fixture(scope="session")
def export_dir(run_dir, tmp_path_factory):
    """That run exported, with the fused graph and the int8 variants."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    command("export", str(run_dir), str(out), "--int8", "--optimize")
    return out



@pytest.fixture(scope="session")
def bpe_run_dir(tmp_path_factory):
    """A tiny byte-level BPE model trained for 40 steps by the real command line."""
    out = tmp_path_factory.mktemp("bpe-run")
    command("launch", str(TINY), f"--train.out_dir={out}", "--train.max_iters=40", *BPE)
    return out


@pytest.fixture(scope="session")
def bpe_export_dir(bpe_run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe-exports") / "tiny-bpe"
    command("export", str(bpe_run_dir), str(out), "--int8", "--optimize")
    return out
