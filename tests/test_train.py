import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, subprocess_env
from gpt.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from gpt.config import ConfigError
from launch.train import TrainingError, check_world_size, get_lr, main, setup


def run(out_dir, *overrides, resume=False):
    config, start = setup(str(TINY), [f"--train.out_dir={out_dir}", *overrides], resume)
    return main(config, start)


def test_training_lowers_val_loss_and_writes_a_run_folder(tmp_path, fresh_accelerate):
    result = run(tmp_path, "--train.max_iters=60", "--train.eval_interval=60")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < 3.1  # from ~4.2 (ln 65) at initialisation
    assert result.metrics["val_loss"] == records[-1]["val_loss"]
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["world_size"] == 1 and report["versions"]["torch"] == torch.__version__
    assert report["config"]["model"]["embedding_dim"] == 32
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000020", "step-000040", "step-000060"]  # keep_checkpoints: 3
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000060"


def test_checkpoint_round_trip_is_exact(tmp_path, fresh_accelerate):
    result = run(tmp_path, "--train.max_iters=20")
    model, tokenizer, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 20 and tokenizer.vocab_size == 65 and model.config.vocab_size == 65
    for (name, a), (_, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    files = {p.name for p in Path(meta["path"]).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "run_config.json", "meta.json",
            "optimizer.bin"} <= files
    assert set(load_file(str(Path(meta["path"]) / "model.safetensors"))) == set(model.state_dict())


def test_existing_checkpoints_are_never_overwritten(tmp_path, fresh_accelerate):
    run(tmp_path, "--train.max_iters=20")
    with pytest.raises(ConfigError, match="--resume"):
        setup(str(TINY), [f"--train.out_dir={tmp_path}"], resume=False)
    with pytest.raises(ConfigError, match="model.embedding_dim"):
        setup(str(TINY), [f"--train.out_dir={tmp_path}", "--model.embedding_dim=64"], resume=True)


def test_resume_continues_to_the_same_weights(tmp_path, fresh_accelerate):
    straight = run(tmp_path / "a", "--train.max_iters=40", "--model.dropout=0.1").model
    # a run folder holding only the step-20 checkpoint of the same run, as a kill after it would leave
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000020", tmp_path / "b" / "checkpoints" / "step-000020")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    resumed = run(tmp_path / "b", "--train.max_iters=40", "--model.dropout=0.1", resume=True).model
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the resumed run's records follow on, with no duplicates


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, fresh_accelerate):
    with pytest.raises(TrainingError, match="diverged") as e:
        run(tmp_path, "--train.max_iters=200", "--train.learning_rate=1e9", "--train.warmup_iters=0",
            "--train.grad_clip=0", "--train.min_lr=1e9", "--train.checkpoint_interval=1", "--train.log_interval=1")
    good = latest_checkpoint(tmp_path)
    assert good is not None and str(good) in str(e.value)
    model, _, _ = load_checkpoint(good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule():
    config, _ = setup(str(TINY), ["--train.out_dir=unused", "--train.warmup_iters=10", "--train.max_iters=110",
                                  "--train.learning_rate=1.0", "--train.min_lr=0.1"], resume=False)
    lrs = [get_lr(s, config) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0  # warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # cosine midpoint
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_launch_mismatch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="cpu_ddp.yaml"):
        check_world_size(1)
    check_world_size(2)


def _launch(out_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "launch", str(TINY), f"--train.out_dir={out_dir}", "--model.dropout=0.1",
         "--train.max_iters=60", "--train.checkpoint_interval=7", "--train.keep_checkpoints=2", *extra],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """Kill -9 at random moments (mid-step, mid-save), resume each time: bit-identical weights."""
    reference = _launch(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    rng = random.Random(os.environ.get("PYTEST_SEED", "kill"))
    out = tmp_path / "killed"
    kills, resume = 0, []
    for _ in range(20):
        before = latest_checkpoint(out)
        proc = _launch(out, *resume)
        # wait until this attempt has saved a checkpoint of its own, then kill at a random moment
        deadline = time.time() + 120
        while latest_checkpoint(out) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stdout.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        resume = ["--resume"]
    assert kills >= 2
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert latest_checkpoint(out).name == "step-000060"
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "launch", str(TINY), f"--train.out_dir={out}",
                           "--model.num_heads=3"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.embedding_dim=32 is not divisible by model.num_heads=3" in lines[0]
    assert not out.exists()


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "launch", "--help"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--section.key=value" in proc.stdout
