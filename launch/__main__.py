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
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if unknown:
        parser.error(f"unrecognized arguments {unknown}: overrides take the form --section.key=value")
    return args, rest


def run(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from gpt.checkpoint import CheckpointError
    from gpt.config import ConfigError
    from gpt.data import DataError
    from launch.train import TrainingError, main, setup

    try:
        config, start_from = setup(args.config, overrides, args.resume)
        main(config, start_from)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
