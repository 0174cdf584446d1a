"""llama.cpp's `llama-server`, the server a user deploying a small model on a CPU reaches for, as a
benchmark baseline: built once from source into the benchmarks' cache, run on our GGUF export.

    python bench/llama_server.py            # build it (or find it built) and print where it is

It is not on PyPI as a program, so it is built from the llama.cpp that llama-cpp-python's source
distribution carries (the version `.ci/constraints.txt` pins, downloaded by pip), or from a llama.cpp
checkout given as --source, with this host's instruction sets and never AMX (`.ci/llama-cpp-args`,
whose reasons hold here too). The build takes minutes on 2 cores and lands in
~/.cache/gpt-bench/llama-server/VERSION-FLAGS/, one per host kind; every command is printed. A
benchmark dependency only: no test and nothing at runtime needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt-bench" / "llama-server"


def pinned_version() -> str:
    """llama-cpp-python's version in .ci/constraints.txt: the llama.cpp the GGUF tests run."""
    text = (ROOT / ".ci" / "constraints.txt").read_text()
    return re.search(r"^llama-cpp-python==(\S+)", text, re.M).group(1)


def arch_flags() -> list[str]:
    """The host's instruction sets as llama.cpp's CMake options (.ci/llama-cpp-args, less its lean
    build, which leaves out the library the server needs)."""
    out = subprocess.run(["sh", str(ROOT / ".ci" / "llama-cpp-args")], capture_output=True, text=True, check=True)
    return [a for a in out.stdout.split() if a.startswith("-DGGML_")]


def run_printed(command: list[str], **kwargs) -> None:
    print("+ " + " ".join(str(c) for c in command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def source_tree(version: str, work: Path) -> Path:
    """llama.cpp's source from llama-cpp-python's source distribution, downloaded by pip."""
    tree = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        run_printed([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                     f"llama-cpp-python=={version}", "-d", str(work)])
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    return tree


def build(source: Path | None = None, jobs: int | None = None) -> Path:
    """The llama-server binary for this host, built first if it is not in the cache."""
    version, flags = pinned_version(), arch_flags()
    tag = source.name if source else version
    home = CACHE / f"{tag}-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:10]}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    tree = source or source_tree(version, home)
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DBUILD_SHARED_LIBS=OFF", *flags]
    print(f"building llama-server (llama.cpp of llama-cpp-python {version}) into {home}: minutes, once", flush=True)
    run_printed(["cmake", "-S", str(tree), "-B", str(home / "build"), *options], stdout=subprocess.DEVNULL)
    run_printed(["cmake", "--build", str(home / "build"), "--target", "llama-server", "-j",
                 str(jobs or os.cpu_count() or 1)], stdout=subprocess.DEVNULL)
    return binary


def start(binary: Path, gguf: Path, port: int, threads: int, slots: int, context: int) -> subprocess.Popen:
    """llama-server on loopback with `slots` parallel sequences (continuous batching, its default), each
    `context` positions (its -c is the whole cache, shared out among the slots)."""
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "-np", str(slots), "-c", str(slots * context), "-b", "2048", "--no-webui"]
    print("+ " + " ".join(command), flush=True)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=None, help="a llama.cpp checkout to build instead")
    parser.add_argument("--rebuild", action="store_true", help="build again even if the cache has it")
    args = parser.parse_args()
    if args.rebuild:
        shutil.rmtree(CACHE, ignore_errors=True)
    print(build(args.source))


if __name__ == "__main__":
    main()
