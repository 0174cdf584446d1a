"""It learns what it is taught: pretrain, fine-tune on conversations, export, answer over the chat API.

    python bench/chat.py                      # everything, in bench/.cache/chat (about 5 minutes on 2 cores)
    python bench/chat.py --base runs/X        # start from a run of yours instead of pretraining one

The task: `shout: WORDS` is answered `WORDS!` in capitals, for phrases of one to three of
Shakespeare's words. A model pretrained on TinyShakespeare (configs/shakespeare_char_cpu.yaml) has
never seen it. The held-out prompts use only words that no training conversation contains, so a
model must have learned the rule, not the answers.

1. pretrain the CPU config (or take --base), timed as a whole process;
2. score the base model on the 200 held-out prompts through the chat template, greedy, in PyTorch:
   the model as fine-tuning finds it (the template's two new tokens added), before any step;
3. fine-tune it (configs/chat_sft_cpu.yaml), as a whole process: the goal is <= 3 minutes;
4. export with --optimize --int4 (every gate), serve the fused int4 graph, and ask the 200 held-out
   prompts through the official openai client's chat.completions.create at temperature 0: the goal
   is >= 90% exact answers. A template that differed anywhere between training and serving would
   show here as lost accuracy.

What the chat API adds to the time per token is measured by `python bench/serve.py --chat`, on
answers long enough to time (these are about 15 tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import machine, wait_healthy  # noqa: E402

HELD_OUT = 200


def task(text: str, count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out conversations; a word is held out (never in training) by its hash."""
    words = sorted({w for w in re.findall(r"[a-z]+", text) if 3 <= len(w) <= 7})
    held = [w for w in words if int(hashlib.sha256(w.encode()).hexdigest(), 16) % 5 == 0]
    seen = sorted(set(words) - set(held))
    rng = np.random.default_rng(seed)

    def phrase(pool):
        while True:
            p = " ".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 4)))
            if len(p) <= 16:  # the longest conversation is 61 tokens: the answer ends inside block_size
                return p

    def conversation(p):
        return {"messages": [{"role": "user", "content": f"shout: {p}"},
                             {"role": "assistant", "content": p.upper() + "!"}]}
    return [conversation(phrase(seen)) for _ in range(count)], [conversation(phrase(held)) for _ in range(HELD_OUT)]


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: see {log}")
    return time.perf_counter() - start


def base_score(base: Path, held: list[dict]) -> int:
    """Exact answers of the base model, given the chat prompt, greedy (PyTorch)."""
    import torch

    from gpt.chat import ChatTemplate, prompt_ids
    from gpt.checkpoint import load_checkpoint
    from gpt.generate import generate
    from gpt.sampling import SamplingParams
    from gpt.sft import chat_tokenizer
    from gpt.tokenizer import stop_ids

    torch.set_num_threads(2)
    model, tokenizer, _ = load_checkpoint(base)
    tokenizer = chat_tokenizer(tokenizer, ChatTemplate.chatml())
    model.grow_vocabulary(tokenizer.vocab_size)
    stops, right = stop_ids(tokenizer), 0
    for c in held:
        ids = prompt_ids(tokenizer, tokenizer.chat, c["messages"][:1])
        out = [t for t in generate(model, ids, 24, SamplingParams(greedy=True), stop=stops) if t not in stops]
        right += tokenizer.decode(out) == c["messages"][1]["content"]
    return right


def ask_all(url: str, held: list[dict]) -> tuple[int, float, str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    right, start, last = 0, time.perf_counter(), ""
    for c in held:
        answer = client.chat.completions.create(model="export", messages=c["messages"][:1], temperature=0,
                                                max_tokens=32)
        last = answer.choices[0].message.content
        right += last == c["messages"][1]["content"]
    return right, time.perf_counter() - start, last


def serve(export: Path, threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "serve.server", str(export), "--port", str(port), "--model",
                             "fused-int4", "--threads", str(threads)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url):
        proc.kill()
        raise SystemExit("the server did not become healthy in 60 s")
    return proc, url


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="a run of ours to fine-tune (default: pretrain the CPU config)")
    parser.add_argument("--work", default=str(ROOT / "bench" / ".cache" / "chat"))
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from gpt.config import DataConfig
    from gpt.datasets import resolve_corpus

    text = resolve_corpus(DataConfig()).read_text(encoding="utf-8")
    train, held = task(text, args.conversations)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in train))
    py = sys.executable
    times = {}
    base = Path(args.base) if args.base else work / "base"
    if not args.base:
        subprocess.run(["rm", "-rf", str(base)], check=True)
        times["pretrain"] = timed([py, "-m", "launch", "configs/shakespeare_char_cpu.yaml",
                                   f"--train.out_dir={base}"], work / "pretrain.log")
    before = base_score(base, held)
    sft = work / "sft"
    subprocess.run(["rm", "-rf", str(sft), str(work / "export")], check=True)
    times["fine-tune"] = timed([py, "-m", "launch", "configs/chat_sft_cpu.yaml", f"--train.init_from={base}",
                                f"--data.path={data}", f"--train.out_dir={sft}"], work / "sft.log")
    times["export"] = timed([py, "-m", "export", str(sft), str(work / "export"), "--optimize", "--int4"],
                            work / "export.log")
    proc, url = serve(work / "export", args.threads)
    try:
        after, seconds, last = ask_all(url, held)
    finally:
        proc.terminate()
        proc.wait()
    report(args, times, before, after, seconds, last, work)


def report(args, times, before, after, seconds, last, work) -> None:
    print(f"machine: {machine()}")
    print(f"task: 'shout: WORDS' -> 'WORDS!', {args.conversations} training conversations, {HELD_OUT} held-out "
          f"prompts of words never seen in training; server: fused int4, {args.threads} threads")
    for step, s in times.items():
        print(f"  {step:10s} {s:6.1f} s (whole process)")
    print(f"base model (before fine-tuning), greedy in PyTorch: {before}/{HELD_OUT} exact ({before / HELD_OUT:.1%})")
    print(f"fine-tuned, exported fused int4, openai client chat.completions: {after}/{HELD_OUT} exact "
          f"({after / HELD_OUT:.1%}; goal >= 90%) in {seconds:.1f} s; last answer {last!r}")
    if "fine-tune" in times:
        print(f"fine-tuning took {times['fine-tune']:.1f} s (goal <= 180 s)")
    print(f"logs in {work}")


if __name__ == "__main__":
    run()
