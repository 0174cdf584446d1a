import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import BPE, ROOT, TINY, free_port, shakespeare, subprocess_env
from gpt.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from gpt.config import ConfigError
from launch import TrainingError
from launch.environment import check_world_size
from launch.train import get_lr, main, setup


def run(out_dir, *overrides, resume=False):
    config, start = setup(str(TINY), [f"--train.out_dir={out_dir}", *overrides], resume)
    return main(config, start)


def test_training_lowers_val_loss_and_writes_a_run_folder(tmp_path, fresh_accelerate):
    result = run(tmp_path, "--train.max_iters=60", "--train.eval_interval=60")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < 3.1  # from ~4.2 (ln 65) at initialisation
    assert result.metrics["val_loss"] == records[-1]["val_loss"]
    logged = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]  # every log_interval
    train_losses = [r["train_loss"] for r in logged]  # each the mean since the line before
    assert train_losses[-1] < train_losses[0] < 4.5 and all(r["tokens_per_s"] > 0 for r in logged)
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


MUON = ["--train.optimizer=muon", "--train.gradient_accumulation_steps=2"]
LLAMA = ["--model.arch=llama", "--model.num_kv_heads=2", *MUON]  # RoPE, RMSNorm, SwiGLU, GQA, with Muon


@pytest.mark.parametrize("tokenizer", [[], BPE, MUON, LLAMA], ids=["char", "bpe", "muon", "llama"])
def test_resume_continues_to_the_same_weights(tmp_path, fresh_accelerate, tokenizer):
    straight = run(tmp_path / "a", "--train.max_iters=40", "--model.dropout=0.1", *tokenizer).model
    # a run folder holding only the step-20 checkpoint of the same run, as a kill after it would leave
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000020", tmp_path / "b" / "checkpoints" / "step-000020")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    resumed = run(tmp_path / "b", "--train.max_iters=40", "--model.dropout=0.1", *tokenizer, resume=True).model
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


def test_lr_schedule(tmp_path):
    config, _ = setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.warmup_iters=10", "--train.max_iters=110",
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
    """Kill -9 at random moments (mid-step, mid-save), resume each time: bit-identical weights. The
    whole path once, with the char corpus and Muon (its momentum in the checkpoint); resuming AdamW
    and a BPE run to the same weights is test_resume_continues_to_the_same_weights."""
    tokenizer = ["--train.optimizer=muon"]
    reference = _launch(tmp_path / "ref", *tokenizer)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    rng = random.Random(os.environ.get("PYTEST_SEED", "kill"))
    out = tmp_path / "killed"
    kills, resume = 0, []
    for _ in range(4):  # three kills at random moments, then a run left to finish
        before = latest_checkpoint(out)
        proc = _launch(out, *tokenizer, *resume)
        if kills == 3:
            assert proc.wait(timeout=300) == 0, proc.stdout.read()
            break
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
    assert kills >= 2, kills
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


# --- lose nothing: what a crash, a second run or a diverging step may not break ---------------------

def test_a_checkpoint_is_flushed_to_disk_before_it_is_published_and_before_latest_moves(tmp_path, fresh_accelerate,
                                                                                        monkeypatch):
    from test_files import DiskLog

    disk = DiskLog(monkeypatch)
    run(tmp_path, "--train.max_iters=20")
    final = tmp_path / "checkpoints" / "step-000020"
    (publish,) = disk.renames(final)
    tmp = disk.events[publish][1]
    for name in json.loads((final / "meta.json").read_text())["files"]:
        assert disk.synced_before(os.path.join(tmp, name), publish), name
    assert disk.synced_before(os.path.join(tmp, "meta.json"), publish) and disk.synced_before(tmp, publish)
    (pointer,) = disk.renames(tmp_path / "checkpoints" / "latest")
    assert pointer > publish and disk.synced_after(tmp_path / "checkpoints", pointer)


def test_an_incomplete_checkpoint_is_skipped_and_resume_falls_back(tmp_path, fresh_accelerate):
    run(tmp_path, "--train.max_iters=40")
    newest = tmp_path / "checkpoints" / "step-000040"
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["files"]["optimizer.bin"] == (newest / "optimizer.bin").stat().st_size
    assert "random_states_0.pkl" in meta["files"] and len(meta["corpus_sha256"]) == 64
    with open(newest / "optimizer.bin", "r+b") as f:  # a disk that lost the file's tail
        f.truncate(100)
    assert latest_checkpoint(tmp_path).name == "step-000020"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020"]
    config, start = setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.max_iters=40"], resume=True)
    assert start.name == "step-000020"
    main(config, start)
    assert latest_checkpoint(tmp_path).name == "step-000040"


def test_non_finite_weights_are_never_checkpointed(tmp_path, fresh_accelerate, monkeypatch):
    """A step that overflows the weights right before a save: the loss check cannot see it, the save must."""
    real_step, steps = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 30:  # the optimizer step that ends step 30, a save step
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(TrainingError, match="inf/NaN at step 30") as e:
        run(tmp_path, "--train.max_iters=40", "--train.checkpoint_interval=10", "--train.eval_interval=100")
    assert "step-000020" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000020"]
    assert latest_checkpoint(tmp_path).name == "step-000020"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # refused before anything was written
    model, _, _ = load_checkpoint(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_fails_at_once_naming_the_first(tmp_path):
    first = _launch(tmp_path, "--train.max_iters=100000", "--train.checkpoint_interval=1000")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.05)
        start = time.time()
        second = subprocess.run([sys.executable, "-m", "launch", str(TINY), f"--train.out_dir={tmp_path}",
                                 "--resume"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
        assert second.returncode == 2 and time.time() - start < 30
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"in use by pid {first.pid}" in line and "--train.out_dir" in line
    finally:
        first.kill()
        first.wait()


def test_resume_refuses_a_changed_corpus_or_vocabulary(tmp_path, fresh_accelerate):
    text = shakespeare()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:200_000])
    out = tmp_path / "run"
    run(out, "--train.max_iters=20", f"--data.path={corpus}")
    corpus.write_text(text[:200_000].replace("e", "a", 5))  # same characters, other text: ids would still fit
    config, start = setup(str(TINY), [f"--train.out_dir={out}", "--train.max_iters=40", f"--data.path={corpus}"],
                          resume=True)
    with pytest.raises(TrainingError, match="corpus has sha256 .* the run trained on"):
        main(config, start)
    corpus.write_text(text[:200_000] + "\u00e9")  # one more character: every id past it would shift
    with pytest.raises(TrainingError, match="tokenizer differs"):
        main(config, start)
    assert latest_checkpoint(out).name == "step-000020"


def test_a_bpe_run_reports_bits_per_byte_and_checkpoints_its_tokenizer(tmp_path, fresh_accelerate):
    run(tmp_path, "--train.max_iters=20", "--train.eval_interval=20", *BPE)
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    from gpt.config import DataConfig
    from gpt.data import prepare

    per_token = prepare(DataConfig(tokenizer="bpe", vocab_size=512)).bytes_per_token("val")
    assert 1.5 < per_token < 3  # bytes per token of the held-out text
    assert record["val_bpb"] == pytest.approx(record["val_loss"] / np.log(2) / per_token)
    model, tokenizer, meta = load_checkpoint(tmp_path)
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == model.config.vocab_size == 512
    assert tokenizer.decode(tokenizer.encode("naïve — ROMEO")) == "naïve — ROMEO"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, fresh_accelerate):
    run(tmp_path, "--train.max_iters=20")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train_lo')  # killed mid-write
    run(tmp_path, "--train.max_iters=30", resume=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [10, 20, 30]


@pytest.mark.parametrize("override, message", [
    ("--train.grad_clip=nan", "train.grad_clip=nan must be a finite number"),
    ("--train.learning_rate=inf", "train.learning_rate=inf must be a finite number"),
    ("--train.seed=-1", "train.seed=-1 must be in [0, 2**32 - 1]"),
    ("--train.seed=4294967296", "train.seed=4294967296 must be in [0, 2**32 - 1]"),
])
def test_non_finite_floats_and_out_of_range_seeds_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        setup(str(TINY), [f"--train.out_dir={tmp_path / 'never'}", override], resume=False)
    assert not (tmp_path / "never").exists()


# --- ready for a GPU: what can be checked without one -----------------------------------------------

@pytest.mark.slow
def test_compile_under_a_process_group_saves_plain_keys_that_load_and_resume(tmp_path, fresh_accelerate,
                                                                              monkeypatch):
    """torch.compile + DDP (a one-process gloo group) + Muon: checkpoints keep plain keys, so export and
    resume work."""
    import torch.distributed as dist

    port = free_port()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                           LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    try:
        result = run(tmp_path, "--train.max_iters=20", "--train.compile=true", "--train.checkpoint_interval=10",
                     "--train.optimizer=muon")
        assert json.loads((tmp_path / "run.json").read_text())["distributed_type"] == "DistributedType.MULTI_CPU"
        keys = set(load_file(str(tmp_path / "checkpoints" / "step-000020" / "model.safetensors")))
        assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
        model, _, _ = load_checkpoint(tmp_path)  # a strict load
        for (name, a), (_, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_mfu_peaks_match_whole_gpu_names_only():
    from launch.flops import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12  # SXM
    assert peak_flops_for("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops_for("NVIDIA H100 NVL", "bf16") == 835e12
    assert peak_flops_for("NVIDIA L4", "no") == 60e12
    assert peak_flops_for("NVIDIA L40S", "bf16") == 362e12  # not L4's
    assert peak_flops_for("NVIDIA RTX A1000", "bf16") is None  # not an A100
    assert peak_flops_for("NVIDIA GeForce RTX 4090 D", "bf16") is None  # a different chip: no guess
    assert peak_flops_for("Tesla T4", "fp16") is None


def test_only_the_main_process_writes_the_grad_scaler():
    from types import SimpleNamespace

    from launch.checkpointing import one_scaler_writer

    scaler = object()
    for main_process, seen in ((True, scaler), (False, None)):
        accelerator = SimpleNamespace(scaler=scaler, is_main_process=main_process)
        with one_scaler_writer(accelerator):
            assert accelerator.scaler is seen
        assert accelerator.scaler is scaler


def test_a_checkpoint_missing_a_ranks_state_is_not_published(tmp_path):
    """On several machines without shared storage a rank's RNG file lands elsewhere: refuse to publish."""
    from types import SimpleNamespace

    from launch.checkpointing import missing_rank_states

    (tmp_path / "random_states_0.pkl").write_bytes(b"")
    two = SimpleNamespace(num_processes=2)
    problem = missing_rank_states(two, tmp_path, tmp_path.parent / "step-000010")
    assert "lacks random_states_1.pkl" in problem and "storage they all share" in problem
    (tmp_path / "random_states_1.pkl").write_bytes(b"")
    assert missing_rank_states(two, tmp_path, tmp_path.parent / "step-000010") == ""


def test_the_best_checkpoint_is_marked_kept_and_exported_by_default(tmp_path, fresh_accelerate, monkeypatch):
    import launch.train as train

    # validation losses that fall, then rise: the best is step 20, long after pruning would drop it
    losses = iter([4.2, 3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # step 0, then every 10 steps
    monkeypatch.setattr(train, "validate", lambda *a: {"train": 1.0, "val": next(losses)})
    run(tmp_path, "--train.max_iters=60", "--train.eval_interval=10", "--train.checkpoint_interval=10",
        "--train.keep_checkpoints=2")
    assert (tmp_path / "checkpoints" / "best").read_text() == "step-000020"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000050", "step-000060"]
    from gpt.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(tmp_path, "best").name == "step-000020"
    assert resolve_checkpoint(tmp_path, "latest").name == "step-000060"
    assert json.loads((tmp_path / "checkpoints" / "step-000020" / "meta.json").read_text())["val_loss"] == 2.0
