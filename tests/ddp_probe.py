"""Test helper: train under any launcher and save each rank's final weights as rank{N}.safetensors.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml tests/ddp_probe.py CONFIG [--fail-rank R] ...

--fail-rank/--fail-step make one rank raise in the middle of training, to check the job ends.
--slow-save-rank makes one rank write its part of every checkpoint a second late;
--die-in-save-rank/--die-in-save-step make one rank die (os._exit) in the middle of that step's checkpoint,
after writing its shards and before the ranks agree it is whole (FSDP);
--slow-build-s makes whichever rank tokenizes the corpus into the cache (the first to take the cache's
lock and find no entry; give the run an empty GPT_CACHE_DIR) take that many seconds longer.
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
parser.add_argument("--slow-build-s", type=float, default=None)
parser.add_argument("--die-in-save-rank", type=int, default=None)
parser.add_argument("--die-in-save-step", type=int, default=None)
parser.add_argument("--resume", action="store_true")
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

if args.slow_build_s is not None:
    import time

    import gpt.data

    real_build = gpt.data._build

    def slow_build(*a, **k):  # inside prepare()'s lock, as a first tokenization of a large corpus would be
        time.sleep(args.slow_build_s)
        return real_build(*a, **k)

    gpt.data._build = slow_build

if args.fail_rank == rank:
    real_get_batch = train.get_batch

    def failing_get_batch(*a, **k):
        if a[5] >= args.fail_step:  # step
            raise RuntimeError(f"injected failure on rank {rank}")
        return real_get_batch(*a, **k)

    train.get_batch = failing_get_batch

if args.die_in_save_rank is not None:
    import launch.checkpointing

    real_save_sharded = launch.checkpointing.save_sharded_state

    def dying_save(accelerator, model, optimizers, folder):
        real_save_sharded(accelerator, model, optimizers, folder)  # the weights and optimizer shards are written
        if rank == args.die_in_save_rank and folder.name.startswith(f".step-{args.die_in_save_step:06d}"):
            os._exit(9)  # dead before the barrier that lets the main process publish

    launch.checkpointing.save_sharded_state = dying_save

config, start = train.setup(args.config, overrides, resume=args.resume)
result = train.main(config, start)
# every rank's whole weights (a sharded model gathers them: every rank takes part)
state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous()
         for k, v in result.model.state_dict().items()}
save_file(state, str(Path(config.train.out_dir) / f"rank{rank}.safetensors"))
(Path(config.train.out_dir) / f"rank{rank}.draw.json").write_text(json.dumps(torch.rand(4).tolist()))
