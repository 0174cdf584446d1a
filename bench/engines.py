"""Real engines that can kill the process that runs them (llama.cpp through llama-cpp-python), run
in a child process, so that a crash is one line of a failure and never takes a test worker or a
benchmark's other rows with it.

A native library can die of a signal no `try` catches: llama.cpp built with `-march=native` on an
Intel host that advertises AMX compiles in tile instructions (`tilezero`), and a sandbox that refuses
a process the tile registers kills it with SIGILL at the first matrix product. `in_child` runs one
function in a fresh interpreter (`python -m bench.engines`) and raises `EngineCrash` when the child
dies of a signal, naming the engine, what it was doing, the signal and this host's CPU flags.

    in_child("llama.cpp", "greedy tokens from model.f32.gguf", "bench.engines:llama_run", {...})

The tests (tests/test_gguf.py) do all their llama.cpp work this way; the benchmarks probe each GGUF
file this way (`llama_probe`: the same context, batch, threads and prompt length as they will use)
before they measure it in-process, and print a crashed row as a line instead of losing the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the flags that decide which kernels a native engine may run, in the order a reader compares hosts
ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
       "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_line(flags: set[str] | None = None) -> str:
    """The vector-instruction flags of this host that matter to native kernels, e.g. 'avx2 fma f16c'."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(f for f in ISA if f in flags) or "none of " + " ".join(ISA[:4])


class EngineCrash(RuntimeError):
    """A real engine killed the child process that ran it (a signal, not an exception)."""


def crash_line(engine: str, what: str, returncode: int) -> str:
    """One line: the engine, what it did, the signal, the host's CPU flags and what to try."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = ""
    if name == "SIGILL":
        hint = ("; an illegal instruction: the library was built for another CPU (-march=native elsewhere, or AMX "
                "this host does not grant): rebuild it as the README's test command does, after "
                "`pip cache remove llama_cpp_python`")
    return f"{engine} died of {name} while {what} (CPU flags: {isa_line()}){hint}"


def in_child(engine: str, what: str, target: str, kwargs: dict, timeout: float = 600) -> dict:
    """`module:function(**kwargs)` run in a fresh interpreter; its JSON result. EngineCrash if the child
    died of a signal; RuntimeError with the end of its stderr if it failed otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run([sys.executable, "-m", "bench.engines", target, str(out)], input=json.dumps(kwargs),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode < 0:
            raise EngineCrash(crash_line(engine, what, proc.returncode))
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise RuntimeError(f"{engine} failed while {what}: {tail[0]}")
        return json.loads(out.read_text())


# --- what the child runs: llama.cpp through llama-cpp-python -------------------------------------------------

def _llama(path: str, n_ctx: int, threads: int, n_batch: int | None = None, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def last_logits(llm):
    """The logits after the last token evaluated: (vocab,). (`Llama.scores` holds them only with
    logits_all, which computes the head on every position of a prompt.)"""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(last_logits(llm).argmax())
        out.append(token)
        llm.eval([token])
    return out


def llama_probe(path: str, n_ctx: int, threads: int, prompt: int, steps: int = 4, n_batch: int | None = None) -> dict:
    """Load a GGUF file and run what a benchmark will: a prompt of `prompt` tokens at once, then `steps`
    single-token steps, with the same context, batch and threads."""
    llm = _llama(path, n_ctx, threads, n_batch)
    return {"tokens": _greedy(llm, [1] * prompt, steps)}


def llama_run(path: str, n_ctx: int, ids: list[int], greedy: int, text: str | None = None,
              logits: bool = False, threads: int = 1) -> dict:
    """What the tests compare with our model: llama.cpp's own tokenization of `text`, its logits at each
    position of `ids`, and `greedy` tokens after `ids`."""
    import numpy as np

    llm = _llama(path, n_ctx, threads, logits_all=logits)
    result: dict = {"greedy": _greedy(llm, ids, greedy)}
    if text is not None:
        result["tokenize"] = llm.tokenize(text.encode(), add_bos=False, special=False)
    if logits:
        llm.reset()
        llm.eval(ids)
        result["logits"] = np.asarray(llm.scores[:len(ids)], dtype=np.float64).tolist()
    return result


def llama_system_info() -> dict:
    """The instruction sets this llama.cpp build uses (`llama_print_system_info`: "AVX2 = 1 | ...")."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    pairs = (part.split("=", 1) for part in info.split("|") if "=" in part)  # "CPU : SSE3 = 1 | AVX = 1 | ..."
    return {"info": info, "flags": {k.split()[-1]: v.strip() for k, v in pairs}}


def main(argv: list[str]) -> None:
    """python -m bench.engines MODULE:FUNCTION RESULT_FILE, the keyword arguments as JSON on stdin."""
    import importlib

    target, out = argv
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(sys.stdin.read()))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
