"""FSDP2 on CPU processes (gloo): really sharded, equal to DDP, sharded checkpoints that resume on any
number of ranks and export like full ones (launch/sharding.py, launch/checkpointing.py)."""

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from test_distributed import PROBE, accelerate, assert_same

from conftest import TINY
from gpt.checkpoint import load_checkpoint, weights_sha256, write_model_files
from gpt.config import ConfigError
from launch.train import setup

FSDP = ["--config_file", "configs/accelerate/fsdp.yaml"]
# Muon (whole matrices gathered under FSDP); no clipping: clipping sums a sharded gradient's norm in
# another order (equal to ~1e-8, not bitwise)
COMMON = ["--train.max_iters=20", "--train.log_interval=5", "--train.eval_interval=10",
          "--train.checkpoint_interval=10", "--train.batch_size=4", "--train.optimizer=muon", "--train.grad_clip=0"]


def copy_checkpoint(run, step, to):
    (to / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"step-{step:06d}", to / "checkpoints" / f"step-{step:06d}")


def rows_per_rank(checkpoint, name):
    """The rows of tensor `name` in each rank's files of a sharded checkpoint (shard-RANK-model-FILE-of-N)."""
    rows = {}
    for path in sorted((checkpoint / "model").glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if name in f.keys():
                rows[path.name.split("-")[1]] = f.get_slice(name).get_shape()[0]
    return list(rows.values())


def assert_really_sharded(run_dir, stdout):
    """A 2-process FSDP run of the tiny config (BPE or char) held, and saved, half of every weight per rank
    (tests/test_distributed.py runs it beside DDP and checks the two end bit-identical)."""
    run = json.loads((run_dir / "run.json").read_text())
    assert run["distributed_type"] == "FSDP2" and run["world_size"] == 2
    sharding = run["sharding"]  # rank 0's own view of its parameters: DTensors holding half the rows
    assert sharding["parameters_here"] < 0.6 * sharding["parameters"], sharding
    assert "(96, 32) holds (48, 32) here" in sharding["example"], sharding
    assert "sharded: FSDP2" in stdout and "peak mem" in stdout
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert not (step / "model.safetensors").exists()  # no rank wrote (or held) the whole state
    assert rows_per_rank(step, "blocks.0.mlp.fc.weight") == [64, 64]  # each rank wrote its own half
    vocab = json.loads((step / "config.json").read_text())["vocab_size"]
    assert rows_per_rank(step, "token_embedding.weight") == [-(-vocab // 2), vocab // 2]  # torch.chunk's split
    meta = json.loads((step / "meta.json").read_text())
    assert meta["sharded"] == {"world_size": 2}
    assert {"rng-rank-00000.safetensors", "rng-rank-00001.safetensors"} <= set(meta["files"])


@pytest.fixture
def one_rank(fresh_accelerate):
    """Training with train.parallelism=fsdp in this process: FSDP over a process group of one, which
    is taken down again after the test."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def single(out, *args, resume=False):
    """One process, FSDP over a process group of one (it resumes any sharded checkpoint), in this
    process as `python -m launch` runs it; returns the console's lines."""
    from launch.train import main

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main(*setup(str(TINY), [f"--train.out_dir={out}", *args], resume=resume))
    return printed.getvalue()


def test_a_sharded_run_resumes_bit_identical_with_its_random_numbers(tmp_path, one_rank):
    args = [*COMMON, "--train.parallelism=fsdp", "--model.dropout=0.1"]  # dropout: the RNG state matters
    single(tmp_path / "straight", *args)
    copy_checkpoint(tmp_path / "straight", 10, tmp_path / "resumed")
    assert "resuming from" in single(tmp_path / "resumed", *args, resume=True)
    assert_same(load_checkpoint(tmp_path / "straight")[0].state_dict(),
                load_checkpoint(tmp_path / "resumed")[0].state_dict())


def test_sharded_checkpoints_resume_on_one_and_two_ranks_survive_a_dying_rank_and_export(tmp_path, one_rank):
    """One process accumulating 2 micro-batches sees the global batch of 2 ranks: 1 -> 2 -> 1 ranks
    over one run ends where the one-process run ends, bit for bit (no dropout: its masks depend on the
    number of ranks). A rank that dies mid-save leaves `latest` on the previous checkpoint."""
    tied = ["--model.tie_embeddings=true"]  # one tensor under two names, stored once
    # 8 sequences a step on any number of ranks: 2 micro-batches of 4 on one, 1 on each of two
    one = [*COMMON, *tied, "--train.max_iters=40", "--train.parallelism=fsdp", "--train.global_batch_size=8"]
    single(tmp_path / "one", *one)
    reference = load_checkpoint(tmp_path / "one")[0].state_dict()

    out = tmp_path / "moved"
    copy_checkpoint(tmp_path / "one", 20, out)  # 1 -> 2 ranks at step 20; rank 1 dies saving step 40
    two = accelerate(*FSDP, PROBE, str(TINY), f"--train.out_dir={out}", *one, "--resume", "--die-in-save-rank", "1",
                     "--die-in-save-step", "40", timeout=240)
    assert two.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000030"
    assert not (out / "checkpoints" / "step-000040").exists()
    assert rows_per_rank(out / "checkpoints" / "step-000030", "blocks.0.mlp.fc.weight") == [64, 64]
    back = single(out, *one, resume=True)  # 2 -> 1 rank at step 30
    assert "resuming from" in back and "step-000030" in back
    # the same bits: each rank read exactly the rows it held, Muon's momentum included
    assert_same(reference, load_checkpoint(out)[0].state_dict())

    # export reads the sharded checkpoint directly: the manifest names the same weights a full copy has
    sharded = out / "checkpoints" / "step-000030"
    model, tokenizer, meta = load_checkpoint(sharded)
    full = tmp_path / "full"
    full.mkdir()
    write_model_files(full, model, tokenizer, {"step": 30}, json.loads((sharded / "run_config.json").read_text()))
    assert weights_sha256(sharded, model) == weights_sha256(full, model)
    from export.pipeline import export

    manifest = export(sharded, tmp_path / "export", log=lambda line: None)  # every gate passed, or it raises
    assert manifest == json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["source"]["model_sha256"] == weights_sha256(full, model)
    assert manifest["source"]["step"] == 30


@pytest.mark.parametrize("env, overrides, problem", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "fsdp_version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, [], "fsdp_offload_params"),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "64"}, [], "too small to shard over 64"),
    ({"WORLD_SIZE": "2"}, ["--train.parallelism=fsdp", "--train.mixed_precision=fp16"], "fp16"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["--train.parallelism=ddp"], "train.parallelism=ddp"),
    ({}, ["--train.parallelism=zero3"], "train.parallelism='zero3'"),
    ({"WORLD_SIZE": "3"}, ["--train.global_batch_size=8"], "not a multiple of train.batch_size=8 x 3"),
    ({"WORLD_SIZE": "2"}, ["--train.global_batch_size=32", "--train.gradient_accumulation_steps=4"], "contradicts"),
])
def test_what_fsdp_cannot_do_is_refused_before_any_work(tmp_path, monkeypatch, env, overrides, problem):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=problem):
        setup(str(TINY), [f"--train.out_dir={tmp_path}", *overrides], resume=False)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_is_resumed_only_as_it_was_written(tmp_path, monkeypatch, fresh_accelerate):
    from launch.train import main

    main(*setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.max_iters=10", "--train.checkpoint_interval=10",
                            "--train.eval_interval=10"], resume=False))
    with pytest.raises(ConfigError, match="written without FSDP.*--train.init_from="):
        setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.parallelism=fsdp"], resume=True)
    sharded = tmp_path / "checkpoints" / "step-000010" / "model"
    sharded.mkdir()  # what a sharded checkpoint has instead of model.safetensors
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(ConfigError, match="written with FSDP.*configs/accelerate/fsdp.yaml"):
        setup(str(TINY), [f"--train.out_dir={tmp_path}"], resume=True)


def test_activation_checkpointing_gives_the_same_gradients():
    from gpt.config import ModelConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=50, dropout=0.0))
    x = torch.randint(0, 50, (2, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model(x, x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert_same(*grads)
