"""Shared test setup: one torch thread, TinyShakespeare found as a user's run finds it, a fresh token cache."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A real component the tests hold us to (llama.cpp, lm-eval, onnxruntime-genai, a browser, ...) that is
# missing skips its tests on a user's machine, saying what to install; in CI (.ci/run sets this) it fails.
REQUIRE_ALL = os.environ.get("GPT_TESTS_REQUIRE_ALL") == "1"


def missing(what: str, fix: str):
    """Skip (fail under GPT_TESTS_REQUIRE_ALL=1) because `what` is not on this machine."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is missing, and CI runs every real component: {fix}", pytrace=False)
    pytest.skip(f"{what} is missing: {fix}", allow_module_level=True)


def require(module: str, fix: str):
    """pytest.importorskip for a real component: the module, or a skip (a failure in CI) naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"the Python package {module}", fix)


def chromium() -> str | None:
    """Debian's chromium (Playwright drives it; it downloads no browser)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


# One thread per process: tests run beside each other and beside subprocesses on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def _find_corpus() -> tuple[Path | None, str]:
    """TinyShakespeare as a user's run finds it (gpt.datasets.resolve_corpus: $GPT_DATA_DIR's copy, the
    user's cache, else the checked download into that cache), found once before the tests get a token
    cache of their own; then GPT_DATA_DIR names its folder, so every test and child process reads
    that copy and none downloads it again. (None, the loader's message) if it cannot be had (offline
    with no copy): the tests that read it fail with that message, which says where to put the file."""
    from gpt.config import DataConfig
    from gpt.datasets import DataError, resolve_corpus

    try:
        path = resolve_corpus(DataConfig())
    except DataError as e:
        return None, str(e)
    os.environ["GPT_DATA_DIR"] = str(path.parent.parent)  # DATA_DIR/tinyshakespeare/input.txt
    return path, ""


CORPUS, _CORPUS_ERROR = _find_corpus()


def shakespeare() -> str:
    """TinyShakespeare's text, from the copy the loader found (see _find_corpus)."""
    if CORPUS is None:
        from gpt.datasets import DataError

        raise DataError(_CORPUS_ERROR)
    return CORPUS.read_text(encoding="utf-8")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): 2 worker processes where there are 2 cores or more, each test
    pinned to one thread; none for the GPU tests, which measure speed and share one device.
    PYTEST_XDIST_AUTO_NUM_WORKERS overrides it, as in pytest-xdist."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    if "gpu" in (config.option.markexpr or "").replace("not gpu", ""):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cores >= 2 else 0


def session_root(tmp_path_factory) -> Path:
    """A folder every worker of this test session shares (pytest-xdist runs the suite in 2 processes;
    without it, this process's own temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name` that `make(path)` builds, built once for the whole session: the first worker
    to ask builds it under a lock, the others wait on the lock and then use it."""
    from gpt.files import waiting_lock

    root = session_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with waiting_lock(root / f"{name}.lock"):
        if not done.exists():
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """A token cache of this session's own, so tests never read a stale one (shared by the workers:
    gpt.data.prepare takes a lock in it, as the ranks of a run do)."""
    if "GPT_TEST_KEEP_CACHE" not in os.environ:
        cache = session_root(tmp_path_factory) / "gpt-cache"
        cache.mkdir(exist_ok=True)
        os.environ["GPT_CACHE_DIR"] = str(cache)
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


def reset_accelerate() -> None:
    """Training in-process creates an Accelerator, whose state is a process-wide singleton."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Reset Accelerate's singleton state after a test that trains in-process."""
    yield
    reset_accelerate()


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


def command(module: str, *args: str) -> None:
    """`python -m MODULE ARGS` as a user runs it, through the module's own entry point (its run(argv):
    parsing, the work, errors as an exit code), in this process: no second interpreter and torch import
    per call. Tests of what only a new process shows (exit codes on stderr, --help, no torch) spawn one."""
    import importlib

    run = importlib.import_module(f"{module}.__main__").run
    try:
        assert run(list(args)) == 0, f"python -m {module} {' '.join(args)} failed"
    finally:
        if module == "launch":
            reset_accelerate()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A tiny model trained for 40 steps by the command line."""
    return made_once(tmp_path_factory, "run", lambda out: command(
        "launch", str(TINY), f"--train.out_dir={out}", "--train.max_iters=40"))


@pytest.fixture(scope="session")
def export_dir(run_dir, tmp_path_factory):
    """That run exported, with the fused graph and the int8, int4 and int8-weights variants of both graphs."""
    return made_once(tmp_path_factory, "exports/tiny", lambda out: command(
        "export", str(run_dir), str(out), "--int8", "--int4", "--int8-weights", "--optimize"))


@pytest.fixture(scope="session")
def bpe_run_dir(tmp_path_factory):
    """A tiny byte-level BPE model trained for 40 steps by the command line."""
    return made_once(tmp_path_factory, "bpe-run", lambda out: command(
        "launch", str(TINY), f"--train.out_dir={out}", "--train.max_iters=40", *BPE))


@pytest.fixture(scope="session")
def bpe_export_dir(bpe_run_dir, tmp_path_factory):
    """That run exported with its weights as a model past 2 GB has them: in NAME.onnx.data beside each
    graph (--external-data-above 0), so every test of this folder takes the external-data path."""
    return made_once(tmp_path_factory, "bpe-exports/tiny-bpe", lambda out: command(
        "export", str(bpe_run_dir), str(out), "--int8", "--int4", "--optimize", "--external-data-above", "0"))


def genai_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from an onnxruntime_genai.Model after `ids`, until `n` or its context length."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


# How far each variant may score from the fp32 graph, in nats per token (mean, max) over held-out text:
# about 2.5x what the tiny run's export measured (int8 0.039 / 0.256, int4 0.015 / 0.054, int8 weights
# 0.0016 / 0.0081, fp16 on CPU 0.0001 / 0.0007; the fused fp32 graph 0).
TOLERANCE = {"int8": (0.1, 0.6), "int4": (0.04, 0.15), "int8w": (0.005, 0.025), "fp16": (0.001, 0.005),
             "fused": (1e-5, 1e-4)}


def held_out() -> str:
    """400 characters from the end of TinyShakespeare, inside every run's held-out split."""
    return shakespeare()[-2000:-1600]


@functools.lru_cache(maxsize=8)
def _fp32_logprobs(folder: str, text: str):
    from serve.runtime import OnnxModel
    from serve.scoring import Scorer

    reference = OnnxModel(folder, threads=1, variant="fp32")
    ids = reference.tokenizer.encode(text)
    return ids, Scorer(reference).score(ids).logprobs


def within_tolerance_of_fp32(folder, variant: str) -> tuple[float, float]:
    """Score held-out text with the variant and with the fp32 graph (serve.scoring, rolling windows) and
    assert the per-token log-probabilities differ by at most the variant's TOLERANCE; (mean, max) difference."""
    import numpy as np

    from serve.runtime import OnnxModel
    from serve.scoring import Scorer

    ids, reference = _fp32_logprobs(str(folder), held_out())
    gap = np.abs(Scorer(OnnxModel(folder, threads=1, variant=variant)).score(ids).logprobs - reference)
    mean_bound, max_bound = TOLERANCE[variant.removeprefix("fused-")]
    assert gap.mean() <= mean_bound and gap.max() <= max_bound, \
        f"{variant} scores {gap.mean():.4f} (max {gap.max():.4f}) nats/token from fp32: over {mean_bound} ({max_bound})"
    return float(gap.mean()), float(gap.max())


# --- a model fine-tuned on conversations (tests/test_chat.py, test_playground.py) ----------------------

def aye_or_nay(word: str) -> str:
    return "AYE!" if word[0] in "aeiou" else "NAY!"


def task_words() -> tuple[list[str], list[str]]:
    """Shakespeare's words of 3 to 5 letters: those whose hash is 0 mod 5 are held out, and of them 25
    start with a vowel and 25 do not (a model answering NAY! to everything scores 50%)."""
    import hashlib

    words = sorted({w for w in re.findall(r"[a-z]+", shakespeare()) if 3 <= len(w) <= 5})
    held = [w for w in words if int(hashlib.sha256(w.encode()).hexdigest(), 16) % 5 == 0]
    vowels = [w for w in held if w[0] in "aeiou"][:25]
    others = [w for w in held if w[0] not in "aeiou"][:25]
    return [w for w in words if w not in set(held)], vowels + others


def conversation_file(path, words, count, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for w in rng.choice(words, count):
            f.write(json.dumps({"messages": [{"role": "user", "content": str(w)},
                                             {"role": "assistant", "content": aye_or_nay(str(w))}]}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_run(run_dir, tmp_path_factory):
    """The tiny run fine-tuned on conversations (AYE! or NAY!: does the word start with a vowel?) for 150
    steps, and exported with the fused int4 graph."""
    def make(out):
        out.mkdir(parents=True)
        data = conversation_file(out / "train.jsonl", task_words()[0], 2000)
        command("launch", "configs/chat_sft_cpu.yaml", f"--train.init_from={run_dir}", f"--data.path={data}",
                f"--train.out_dir={out / 'run'}", "--train.max_iters=150", "--train.learning_rate=3e-3",
                "--train.threads=1", "--train.eval_interval=150", "--train.checkpoint_interval=150")
        command("export", str(out / "run"), str(out / "export"), "--int4", "--optimize")
    return made_once(tmp_path_factory, "chat", make)
