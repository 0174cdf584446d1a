"""Muon (launch/optim.py) against torch.optim.Muon's definition, and the trackers of train.log_with."""

import csv
import json

import pytest
import torch

from conftest import TINY
from gpt.config import ConfigError
from launch.optim import Muon, make_optimizers, newton_schulz
from launch.train import main, setup


def test_newton_schulz_batched_equals_torchs_one_matrix_at_a_time():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in ((48, 16), (16, 48), (32, 32)):
        grads = torch.randn(3, *shape, generator=g)
        ours = newton_schulz(grads, torch.bfloat16)
        for grad, o in zip(grads, ours):
            theirs = _zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7)
            torch.testing.assert_close(o.float(), theirs.float(), atol=2e-2, rtol=0)
        # in fp32 (the CPU's), as close to torch's bf16 result as bf16 allows, and nearly orthogonal
        fp32 = newton_schulz(grads, torch.float32)
        torch.testing.assert_close(fp32, ours.float(), atol=3e-2, rtol=0)
        small = min(shape)
        s = torch.linalg.svdvals(fp32)
        assert s.shape[-1] == small and (s > 0.5).all() and (s < 1.5).all()  # U S' V^T, S' ~ (0.5, 1.5)


def test_a_muon_step_equals_torch_optim_muon():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g), torch.randn(8, 32, generator=g)]
    grads = [torch.randn_like(w) for w in weights]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    a = Muon(ours, lr=0.01, momentum=0.9, weight_decay=0.1, dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.01, momentum=0.9, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=3e-3, rtol=0)
        assert not torch.equal(p, torch.zeros_like(p))
    assert set(a.state_dict()["state"][0]) == {"momentum_buffer"}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tmp_path):
    from gpt.model import GPT

    config, _ = setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.optimizer=muon", "--train.embedding_lr=0.01",
                                  "--train.scalar_lr=0.002"], resume=False)
    model = GPT(config.model.__class__(**{**vars(config.model), "vocab_size": 65, "tie_embeddings": True}))
    muon, adamw = make_optimizers(model, config.train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert on_muon and all(n.startswith("blocks.") and n.endswith("weight") and "ln" not in n for n in on_muon)
    embeddings, scalars = adamw.param_groups
    assert {names[id(p)] for p in embeddings["params"]} == {"token_embedding.weight", "position_embedding.weight"}
    assert embeddings["base_lr"] == 0.01 and scalars["base_lr"] == 0.002 and scalars["weight_decay"] == 0.0
    counted = sum(len(g["params"]) for o in (muon, adamw) for g in o.param_groups)
    assert counted == len(list(model.parameters()))  # every parameter once, the tied head included once


def test_muon_trains_as_well_as_adamw_in_a_short_run(tmp_path, fresh_accelerate):
    losses = {}
    for optimizer in ("adamw", "muon"):
        config, start = setup(str(TINY), [f"--train.out_dir={tmp_path / optimizer}", "--train.max_iters=60",
                                          "--train.eval_interval=60", f"--train.optimizer={optimizer}"], False)
        losses[optimizer] = main(config, start).metrics["val_loss"]
    assert losses["muon"] < 3.1 and abs(losses["muon"] - losses["adamw"]) < 0.1, losses  # from ~4.2 (ln 65)


def test_the_old_tensorboard_flag_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match="train.tensorboard was replaced: use train.log_with=tensorboard"):
        setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.tensorboard=true"], resume=False)
    with pytest.raises(ConfigError, match="train.log_with='comet' must be one of none, tensorboard, wandb"):
        setup(str(TINY), [f"--train.out_dir={tmp_path}", "--train.log_with=comet"], resume=False)


def test_csv_and_tensorboard_trackers_hold_what_metrics_jsonl_holds(tmp_path, fresh_accelerate):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tracker in ("csv", "tensorboard"):
        out = tmp_path / tracker
        config, start = setup(str(TINY), [f"--train.out_dir={out}", "--train.max_iters=20", "--train.eval_interval=10",
                                          f"--train.log_with={tracker}"], resume=False)
        main(config, start)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        expected = {("train/loss", r["step"]): r["train_loss"] for r in records if "train_loss" in r}
        expected |= {("eval/val_loss", r["step"]): r["val_loss"] for r in records if "val_loss" in r}
        if tracker == "csv":
            rows = list(csv.DictReader((out / "tracking" / "metrics.csv").open()))
            got = {(r["name"], int(r["step"])): float(r["value"]) for r in rows}
            assert {r["name"] for r in rows} >= {"train/loss", "lr", "tokens_per_s", "eval/val_loss", "eval/val_bpb"}
            assert json.loads((out / "tracking" / "config.json").read_text())["train.log_with"] == "csv"
        else:
            events = list((out / "tracking").rglob("events.out.tfevents.*"))
            assert events, "no event file"
            acc = EventAccumulator(str(events[0].parent))
            acc.Reload()
            got = {(tag, e.step): e.value for tag in ("train/loss", "eval/val_loss") for e in acc.Scalars(tag)}
            assert "lr" in acc.Tags()["scalars"]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (tracker, key)
