"""Test helper: train under any launcher and save each rank's final weights as rank{N}.safetensors.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml tests/ddp_probe.py CONFIG [--fail-rank R] ...

--fail-rank/--fail-step make one rank raise in the middle of training, to check the job ends.
--slow-save-rank makes one rank write its part of every checkpoint a second late;
--slow-prepare-rank makes one rank take --slow-prepare-s seconds to prepare the data.
Each rank also writes rank{N}.draw.json: four random numbers drawn after training.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import launch.train as train  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--fail-step", type=int, default=5)
parser.add_argument("--slow-save-rank", type=int, default=None)
parser.add_argument("--slow-prepare-rank", type=int, default=None)
parser.add_argument("--slow-prepare-s", type=float, default=8.0)
args, overrides = parser.parse_known_args()
rank = int(os.environ.get("RANK", "0"))

if args.slow_save_rank == rank:
    import time

    import accelerate.accelerator

    real_save = accelerate.accelerator.save_accelerator_state

    def slow_save(*a, **k):
        time.sleep(1.0)
        return real_save(*a, **k)

    accelerate.accelerator.save_accelerator_state = slow_save

if args.slow_prepare_rank == rank:
    import time

    import gpt.data

    real_resolve = gpt.data.resolve_corpus

    def slow_resolve(*a, **k):  # inside prepare(), as a first tokenization of a large corpus would be
        time.sleep(args.slow_prepare_s)
        return real_resolve(*a, **k)

    gpt.data.resolve_corpus = slow_resolve

if args.fail_rank == rank:
    real_get_batch = train.get_batch

    def failing_get_batch(*a, **k):
        if a[5] >= args.fail_step:  # step
            raise RuntimeError(f"injected failure on rank {rank}")
        return real_get_batch(*a, **k)

    train.get_batch = failing_get_batch

config, start = train.setup(args.config, overrides, resume=False)
result = train.main(config, start)
state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
save_file(state, str(Path(config.train.out_dir) / f"rank{rank}.safetensors"))
(Path(config.train.out_dir) / f"rank{rank}.draw.json").write_text(json.dumps(torch.rand(4).tolist()))
