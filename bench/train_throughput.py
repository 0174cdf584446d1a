"""Training tokens/s: the toolkit's loop (launch.train.fit, through Accelerate) against a bare eager loop.

Both train the same model shape on the same batches in this one process, one after the other,
with the same thread count; the script prints tokens/s for each and their ratio.

    python bench/train_throughput.py                      # nanoGPT's "baby" shape on CPU
    python bench/train_throughput.py --config configs/shakespeare_char.yaml --mixed-precision bf16  # GPU

The bare loop is what a tutorial writes: a batch, forward, backward, clip, AdamW step. The
toolkit adds Accelerate's wrappers, the lr schedule, logging, and the finite-loss check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from gpt.config import load_run_config  # noqa: E402
from gpt.data import get_batch, prepare  # noqa: E402
from gpt.model import GPT  # noqa: E402

BABY = ["--model.num_layers=4", "--model.num_heads=4", "--model.embedding_dim=128", "--model.block_size=64",
        "--train.batch_size=12", "--model.dropout=0.0"]


def bare_loop(config, corpus, steps: int, device: torch.device, dtype: torch.dtype | None) -> float:
    """tokens/s of the plainest eager loop for the same model and batches."""
    torch.manual_seed(config.train.seed)
    model = GPT(dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size)).to(device)
    t = config.train
    opt = torch.optim.AdamW(model.optimizer_groups(t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                            fused=True)  # the same optimizer as the toolkit: this measures the loop around it
    B, T = t.batch_size, config.model.block_size

    def one(step):
        x, y = get_batch(corpus.train, B, T, t.seed, "train", step, 0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(x.to(device), y.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for s in range(min(10, steps)):  # warm up
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        loss = one(s)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return B * T * steps / (time.perf_counter() - start)


def toolkit_loop(config, steps: int) -> tuple[float, dict]:
    """tokens/s as the toolkit's own training loop reports it (evaluation and saving excluded)."""
    from launch.train import main

    with tempfile.TemporaryDirectory() as out:
        t = config.train
        config = dataclasses.replace(config, train=dataclasses.replace(
            t, out_dir=out, max_iters=steps + 10, warmup_iters=0, log_interval=10, eval_interval=10 ** 9,
            checkpoint_interval=10 ** 9, eval_iters=1))
        # fit() measures tokens/s between log lines; the first window includes warm-up, so use the rest
        last = main(config, None).metrics
        rates = [r for r in _read_rates(Path(out) / "metrics.jsonl")[1:]]
    return sum(rates) / len(rates), last


def _read_rates(path: Path) -> list[float]:
    import json

    return [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in r]


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare_char_cpu.yaml")
    parser.add_argument("--baby", action="store_true", default=None, help="nanoGPT's baby shape (default on CPU)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    args, overrides = parser.parse_known_args(argv)  # --section.key=value, as every other command takes them
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baby = args.baby if args.baby is not None else device.type == "cpu"
    overrides = (BABY if baby else []) + [f"--train.mixed_precision={args.mixed_precision}"] + overrides
    threads = args.threads or len(os.sched_getaffinity(0))
    overrides.append(f"--train.threads={threads}")
    config = load_run_config(args.config, overrides)
    torch.set_num_threads(threads)
    corpus = prepare(config.data)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None

    m = config.model
    print(f"machine: {machine()}")
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, "
          f"shape L{m.num_layers} H{m.num_heads} C{m.embedding_dim} T{m.block_size} B{config.train.batch_size}, "
          f"precision {args.mixed_precision}, {args.steps} timed steps")
    bare = bare_loop(config, corpus, args.steps, device, dtype)
    tool, last = toolkit_loop(config, args.steps)
    print(f"bare eager loop : {bare:12,.0f} tokens/s")
    print(f"toolkit (fit)   : {tool:12,.0f} tokens/s" + (f", MFU {last['mfu']:.1%}" if last.get("mfu") else ""))
    print(f"ratio toolkit/bare: {tool / bare:.3f} (overhead {1 - tool / bare:+.1%})")


if __name__ == "__main__":
    run()
