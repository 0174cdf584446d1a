"""The portable graph the builder writes (export/portable.py): PyTorch's function, the trace's graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.graph import example_inputs, trace
from export.pipeline import export
from export.portable import build_portable
from gpt.config import ModelConfig
from gpt.model import GPT
from serve.manifest import LOGITS_TO_KEEP, ExportError, read_manifest
from serve.runtime import OnnxModel


def _run(path, ids, mask, positions, cache) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i, (k, v) in enumerate(cache):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    return session.run(None, feeds)


def _padded_batch(config: ModelConfig, past: int, seq: int):
    """Three rows after a past: the first unpadded, the others left-padded by two tokens."""
    ids, mask, positions, cache = example_inputs(config, 3, seq, past, left_pad=2, seed=past + seq)
    mask[0, :] = 1
    positions[0] = torch.arange(past, past + seq)
    return ids, mask, positions, cache


@pytest.mark.parametrize("tied, bias", [(True, True), (False, False)])
def test_the_builder_writes_what_pytorch_computes(tmp_path, tied, bias):
    """Logits and the whole present cache, for a prompt and for tokens after a past, with left padding."""
    torch.manual_seed(0)
    config = ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=57, bias=bias,
                         tie_embeddings=tied)
    model = GPT(config).eval()
    build_portable(model, tmp_path / "model.onnx")
    for past, seq in ((0, 6), (5, 1), (5, 4)):
        ids, mask, positions, cache = _padded_batch(config, past, seq)
        with torch.no_grad():
            ref = model(ids, past=cache, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, *present = _run(tmp_path / "model.onnx", ids, mask, positions, cache)
        scale = float(ref.logits.abs().max())
        assert np.abs(logits - ref.logits.numpy()).max() / scale < 1e-5, (past, seq)
        expected = [t.numpy() for kv in ref.present for t in kv]
        assert max(float(np.abs(a - b).max()) for a, b in zip(present, expected)) < 1e-5, (past, seq)
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert {n.domain for n in graph.graph.node} == {""}, "standard ONNX ops only"
    names = {t.name for t in graph.graph.initializer}
    assert ("lm_head.weight_t" in names) is not tied, "a tied head reads the token table: one copy, as in the model"


def test_the_builder_and_the_dynamo_trace_write_the_same_function(tmp_path):
    torch.manual_seed(1)
    config = ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=57,
                         tie_embeddings=True)
    model = GPT(config).eval()
    build_portable(model, tmp_path / "built.onnx")
    assert trace(model, tmp_path / "traced.onnx", 18, "dynamo") == "dynamo"
    ids, mask, positions, cache = _padded_batch(config, 5, 4)
    built = _run(tmp_path / "built.onnx", ids, mask, positions, cache)
    traced = _run(tmp_path / "traced.onnx", ids, mask, positions, cache)
    assert max(float(np.abs(a - b).max()) for a, b in zip(built, traced)) < 1e-5


def test_a_prefill_asks_for_the_last_logits_alone_and_the_rest_get_every_position(export_dir):
    """logits_to_keep, an input with a default: N keeps the last N positions' logits, 0 (its default,
    whatever does not bind it) every position. Every graph of the folder has it, quantized ones too, and
    onnxruntime lists it apart from the inputs the manifest names (as onnxruntime-genai binds them)."""
    import onnxruntime as ort

    manifest = read_manifest(export_dir)
    ids = np.array([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask, positions = np.ones_like(ids), np.tile(np.arange(5), (2, 1))
    for variant in manifest["files"]:
        runtime = OnnxModel(export_dir, threads=1, variant=variant)
        assert manifest["graphs"][variant]["logits_to_keep"] and runtime.keeps_logits, variant
        assert LOGITS_TO_KEEP not in [i.name for i in runtime.session.get_inputs()]
        full, _ = runtime.run(ids, mask, positions, runtime.empty_cache(2))
        last, _ = runtime.run(ids, mask, positions, runtime.empty_cache(2), last_only=True)
        again, _ = runtime.run(ids, mask, positions, runtime.empty_cache(2))  # a reused binding: all again
        assert full.shape == again.shape == (2, 5, runtime.vocab_size) and last.shape == (2, 1, runtime.vocab_size)
        # dynamic int8 quantizes the head's input per tensor: one row alone gets a scale of its own
        tolerance = 5e-2 if variant.endswith("int8") else 1e-5
        assert np.abs(last[:, 0] - full[:, -1]).max() <= tolerance * np.abs(full).max(), variant
        assert np.array_equal(again, full), variant
    session = ort.InferenceSession(str(export_dir / manifest["files"]["fp32"]), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds |= {i.name: np.zeros([2, *i.shape[1:2], 0, *i.shape[3:]], np.float32) for i in session.get_inputs()[3:]}
    two = session.run(["logits"], feeds | {LOGITS_TO_KEEP: np.array([2])})[0]
    assert np.allclose(two, session.run(["logits"], feeds)[0][:, -2:], atol=1e-6)


def test_a_changed_model_fails_the_gates_and_the_trace_follows_it(run_dir, tmp_path, monkeypatch):
    """The builder knows the model as it ships: a change to gpt/model.py (ReLU for GELU here) fails the
    parity gate in one line that names the fix, and the dynamo trace of the changed code passes."""
    import torch.nn.functional as F

    from gpt import model as gpt_model

    monkeypatch.setattr(gpt_model.FeedForward, "forward", lambda self, x: self.proj(F.relu(self.fc(x))))
    with pytest.raises(ExportError, match=r"^ONNX Runtime and PyTorch disagree: .*; the builder writes the model "
                                          r"as gpt/model.py ships it: .* export with --exporter dynamo") as e:
        export(run_dir, tmp_path / "built", log=lambda s: None)
    assert "\n" not in str(e.value) and not (tmp_path / "built").exists()
    manifest = export(run_dir, tmp_path / "traced", exporter="dynamo", log=lambda s: None)
    assert manifest["parity"]["fp32"]["passed"] and manifest["export_options"]["exporter"] == "dynamo"
    assert not manifest["graphs"]["fp32"]["logits_to_keep"]  # a trace computes every position's; prefills take the last


def test_the_builder_needs_opset_17_and_says_so_before_anything_runs(run_dir, tmp_path):
    with pytest.raises(ExportError, match=r"^--opset 16: the portable graph's LayerNormalization needs opset 17 "
                                          r"or later: use a later --opset, or --exporter dynamo$"):
        export(run_dir, tmp_path / "old", opset=16, log=lambda s: None)
    assert not (tmp_path / "old").exists()
