"""DDP (and FSDP2) through `accelerate launch` on CPU processes (gloo): really synchronised, really equivalent."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import BPE, ROOT, TINY, free_port, subprocess_env

pytestmark = pytest.mark.slow
PROBE = str(ROOT / "tests" / "ddp_probe.py")
COMMON = ["--train.max_iters=20", "--train.log_interval=5", "--train.eval_interval=20",
          "--train.checkpoint_interval=20", "--train.batch_size=4"]


def accelerate(*args, timeout=240, **env):
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args], cwd=ROOT,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def train_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_cpu_processes_train_in_sync_and_match_one_process_on_the_same_global_batch(tmp_path):
    """On a BPE corpus (the char one is the slow-ranks test's): 2 ranks stay bit-identical, and equal
    one process that accumulates the same global batch. FSDP2 over the same 2 ranks, launched as two
    machines on loopback, holds half of every weight and ends bit-identical to DDP (without clipping:
    a sharded gradient norm is summed in another order, equal to ~1e-8, not bitwise)."""
    tokenizer = [*BPE, "--train.grad_clip=0"]
    ddp = accelerate("--config_file", "configs/accelerate/cpu_ddp.yaml", PROBE, str(TINY),
                     f"--train.out_dir={tmp_path / 'ddp'}", *COMMON, *tokenizer)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    assert_same(rank0, rank1)  # synchronised: the two replicas end bit-identical

    # FSDP2 over two machines on loopback (one process each): the launcher's multi-node path and sharding
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
         "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), PROBE, str(TINY), f"--train.out_dir={tmp_path / 'fsdp'}", *COMMON,
         *tokenizer], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    from test_fsdp import assert_really_sharded

    assert_really_sharded(tmp_path / "fsdp", outputs[0])
    assert_same(rank0, load_file(str(tmp_path / "fsdp" / "rank0.safetensors")))  # bit-identical to DDP
    assert_same(rank0, load_file(str(tmp_path / "fsdp" / "rank1.safetensors")))

    # one process accumulating 2 micro-batches sees the same global batch as 2 ranks of 1
    single = subprocess.run([sys.executable, PROBE, str(TINY), f"--train.out_dir={tmp_path / 'one'}", *COMMON,
                             *tokenizer, "--train.gradient_accumulation_steps=2"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stdout + single.stderr
    assert_same(rank0, load_file(str(tmp_path / "one" / "rank0.safetensors")), exact=False)
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "ddp")),
                               torch.tensor(train_losses(tmp_path / "one")), atol=1e-5, rtol=1e-5)


def test_slow_ranks_are_waited_for_and_each_rank_draws_its_own_random_numbers(tmp_path):
    """Rank 1 writes its part of each checkpoint late: nothing is published without it. The rank that
    tokenizes the corpus (into an empty cache) takes longer than the process group's timeout: the other
    rank waits on the cache's lock, not in a collective. With dropout, the ranks draw different masks.
    With Muon, each rank orthogonalises the same averaged gradient: the replicas stay identical."""
    out = tmp_path / "slow"
    proc = accelerate("--config_file", "configs/accelerate/cpu_ddp.yaml", PROBE, str(TINY), f"--train.out_dir={out}",
                      *COMMON, "--train.checkpoint_interval=10", "--slow-save-rank", "1", "--model.dropout=0.1",
                      "--train.optimizer=muon",
                      "--slow-build-s", "8", "--train.dist_timeout_s=5", GPT_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1  # one rank tokenized (slowly), once
    draws = [json.loads((out / f"rank{r}.draw.json").read_text()) for r in (0, 1)]
    assert draws[0] != draws[1]  # nanoGPT's seed + rank: not the same dropout masks on every rank
    assert_same(load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors")))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "latest", "step-000010", "step-000020"]  # no temp
    for step in ("step-000010", "step-000020"):
        meta = json.loads((checkpoints / step / "meta.json").read_text())
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(meta["files"]), step
        for name, size in meta["files"].items():
            assert (checkpoints / step / name).stat().st_size == size, (step, name)


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path):
    start = time.time()
    proc = accelerate("--config_file", "configs/accelerate/cpu_ddp.yaml", PROBE, str(TINY),
                      f"--train.out_dir={tmp_path}", *COMMON, "--fail-rank", "1", "--fail-step", "5",
                      "--train.dist_timeout_s=30", timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 60
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
