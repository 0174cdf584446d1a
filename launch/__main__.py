"""Command line: parse, call launch.train, turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Train a GPT (char or byte-level BPE tokens). Runs in one process, or under "
        "`accelerate launch -m launch` on one GPU, DDP over GPUs or CPU processes, or several machines.",
        epilog="Overrides: any --section.key=value, e.g. --train.max_iters=500 --model.dropout=0.1. "
        "Example: python -m launch configs/shakespeare_char_cpu.yaml --train.out_dir=runs/mine",
    )
    parser.add_argument("config", help="YAML run config, e.g. configs/shakespeare_char_cpu.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its newest checkpoint")
    return parser.parse_known_args(argv)  # the rest are overrides, checked by gpt.config.parse_overrides


def run(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from gpt.checkpoint import CheckpointError
    from gpt.cli import run_command
    from gpt.config import ConfigError
    from gpt.data import DataError
    from launch import TrainingError
    from launch.train import main, setup

    def work() -> None:
        config, start_from = setup(args.config, overrides, args.resume)
        main(config, start_from)

    return run_command(work, (ConfigError, DataError, CheckpointError, TrainingError),
                       interrupted="interrupted: resume with --resume from the last checkpoint")


if __name__ == "__main__":
    from gpt.cli import leave

    leave(run())
