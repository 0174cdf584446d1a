"""The fused graph (`export --optimize`): onnxruntime's fused ops, its gates, and a KV cache written in place."""

import copy
import json
import shutil

import numpy as np
import pytest

from gpt.checkpoint import load_checkpoint
from gpt.generate import generate as torch_generate
from gpt.sampling import SamplingParams
from serve.batch import Sequence, SlotBatch, make_batch
from serve.cache import CacheBuffers
from serve.generate import generate
from serve.manifest import DeviceError, ExportError, read_manifest
from serve.runtime import OnnxModel


def test_the_fused_graph_is_made_of_fused_ops_and_passed_the_gates(export_dir):
    import onnx

    manifest = read_manifest(export_dir)
    graph = manifest["graphs"]["fused"]
    assert manifest["files"]["fused"] == "model.fused.onnx" and graph["cache"] == "shared"
    ops = [n.op_type for n in onnx.load(str(export_dir / "model.fused.onnx")).graph.node]
    assert {op: ops.count(op) for op in set(ops)} == graph["ops"]  # the manifest records what the file holds
    # per block: one attention op on packed QKV, two SkipLayerNormalization (residual + bias + LayerNorm), FastGelu
    assert graph["ops"]["GroupQueryAttention"] == 2 and graph["ops"]["FastGelu"] == 2
    assert graph["ops"]["SkipLayerNormalization"] == 5  # 2 per block and ln_f
    assert not {"Concat", "Softmax", "LayerNormalization", "Transpose", "Where"} & set(ops)
    assert graph["nodes"] * 3 < manifest["graphs"]["fp32"]["nodes"]
    assert manifest["parity"]["fused"]["passed"] and manifest["parity"]["fused"]["max_rel_logit_error"] < 1e-4
    assert {(c["batch"], c["ragged"]) for c in manifest["parity"]["fused"]["grid"]} >= {(3, True), (3, False)}
    assert manifest["parity"]["fused_greedy"] == {"tokens": 200, "identical": True, "first_difference": None}
    assert manifest["graphs"]["fused-int8"]["cache"] == "shared"
    assert abs(manifest["quality"]["fused-int8"]["val_loss_change"]) < 0.05


def test_slot_batch_joins_and_leaves_match_pytorch_and_never_copy_the_cache(run_dir, export_dir, monkeypatch):
    model, _, _ = load_checkpoint(run_dir)
    runtime = OnnxModel(export_dir, threads=1, variant="fused")
    batch = make_batch(runtime, slots=3)
    assert isinstance(batch, SlotBatch)
    buffers, pointers = batch.buffers, list(batch.buffers._pointers)

    def copied(*args, **kwargs):
        raise AssertionError("the cache went through the host")

    monkeypatch.setattr(CacheBuffers, "host", copied)
    monkeypatch.setattr(CacheBuffers, "grown", copied)
    monkeypatch.setattr(OnnxModel, "to_host", copied)
    monkeypatch.setattr(OnnxModel, "to_device", copied)

    tok = runtime.tokenizer
    sampled = SamplingParams(temperature=1.0, top_k=20)
    specs = {"a": ("ROMEO:", 70, SamplingParams(greedy=True)), "b": ("First Citizen:\nBefore we", 12, sampled),
             "c": ("O", 50, sampled), "d": ("JULIET:", 45, SamplingParams(greedy=True))}
    made = {k: Sequence(tok.encode(p), n, params, seed=i, tag=k) for i, (k, (p, n, params)) in enumerate(specs.items())}
    done, slots_taken = {}, {}

    def step():
        for e in batch.step():
            if e.finished:
                done[e.sequence.tag] = e.sequence.generated

    batch.add([made["a"]])
    slots_taken["a"] = batch.slot_of[id(made["a"])]
    for _ in range(5):
        step()
    batch.add([made["b"], made["c"]])  # join while "a" decodes
    slots_taken |= {k: batch.slot_of[id(made[k])] for k in "bc"}
    while "b" not in done:  # "b" is short and leaves first, freeing slot 1
        step()
    batch.add([made["d"]])
    slots_taken["d"] = batch.slot_of[id(made["d"])]
    while len(batch):
        step()
    assert slots_taken == {"a": 0, "b": 1, "c": 2, "d": 1}  # a sequence takes the lowest free slot
    assert batch.buffers is buffers and batch.buffers._pointers == pointers  # allocated once, written in place
    for k, (prompt, n, params) in specs.items():  # "a" and "c" pass block_size=32 and refill their window
        ref = list(torch_generate(model, tok.encode(prompt), n, params, seed=list(specs).index(k)))
        assert done[k] == ref, k


def test_more_sequences_than_slots_grow_the_buffers_once(export_dir):
    runtime = OnnxModel(export_dir, threads=1, variant="fused")
    prompts = ["ROMEO:", "JULIET:", "O", "KING HENRY:", "Nurse:\n"]
    alone = [list(generate(runtime, p, 20, SamplingParams(greedy=True)))[-1].sequence.generated for p in prompts]
    batch = make_batch(runtime, slots=2)
    batch.add([Sequence(runtime.tokenizer.encode(p), 20, SamplingParams(greedy=True), tag=i)
               for i, p in enumerate(prompts)])
    assert batch.buffers.slots == 8
    got = {}
    while len(batch):
        for e in batch.step():
            got[e.sequence.tag] = e.sequence.generated
    assert [got[i] for i in range(5)] == alone


@pytest.mark.parametrize("fixed", [True, False], ids=["mask bound once", "mask bound each step"])
def test_a_decode_step_marks_its_mask_in_place_and_binds_nothing(export_dir, monkeypatch, fixed):
    """On CPU a step's mask has the cache's full width and is bound once; each step marks one more
    token per row in place. Bound at its exact width each step (as on CUDA), it decodes the same."""
    import serve.cache

    if not fixed:
        monkeypatch.setattr(serve.cache, "FIXED_MASK_DEVICES", set())
    runtime = OnnxModel(export_dir, threads=1, variant="fused")
    tok, greedy = runtime.tokenizer, SamplingParams(greedy=True)
    prompts = ["ROMEO:", "O", "JULIET: what"]
    alone = [list(generate(runtime, p, 12, greedy))[-1].sequence.generated for p in prompts]
    batch = make_batch(runtime, slots=3)
    made = [Sequence(tok.encode(p), 12 - 6 * (i == 1), greedy, tag=i) for i, p in enumerate(prompts)]
    batch.add(made)
    batch.step()
    step = batch.steps[3]
    if fixed:
        def rebound(*args, **kwargs):
            raise AssertionError("a decode step bound an input again")

        monkeypatch.setattr(step.binding, "bind_input", rebound)
    got = {}
    while len(batch):
        for e in batch.step():
            got[e.sequence.tag] = e.sequence.generated
        if 1 in batch.free and len(batch):  # the short one has left: its row decodes a dummy token alone
            assert batch.length[1] == 0 and step.mask[1].tolist() == [1] + [0] * (runtime.block_size - 1)
    assert step.mask.shape == (3, runtime.block_size)
    ones = [list(map(int, row)) for row in step.mask]
    assert [row.count(1) for row in ones] == [max(k, 1) for k in step.marked] and all(
        row == sorted(row, reverse=True) for row in ones)  # each row a prefix of ones
    assert [got[i] for i in range(3)] == [alone[0], alone[1][:6], alone[2]]


def test_the_command_line_takes_the_fused_graph_by_default(export_dir):
    assert OnnxModel(export_dir, variant="auto").variant == "fused"
    manifest = read_manifest(export_dir)
    from serve.runtime import auto_variant

    assert auto_variant(manifest, "cuda") == "fp32"  # no fp16 fused graph in this folder
    assert auto_variant({**manifest, "files": {**manifest["files"], "fused-fp16": "model.fused.fp16.onnx"}},
                        "cuda") == "fused-fp16"
    with pytest.raises(DeviceError, match="no fp32 CUDA kernel: on cuda use the fp16 fused graph"):
        OnnxModel(export_dir, device="cuda", variant="fused")


def test_an_export_from_before_the_fused_graph_still_serves(export_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("graphs",):
        manifest.pop(key)
    for variant in [v for v in manifest["files"] if v.startswith("fused")]:
        (old / manifest["files"].pop(variant)).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    runtime = OnnxModel(old, variant="auto")
    assert runtime.variant == "fp32" and not runtime.shared_cache
    new = OnnxModel(export_dir, variant="fp32")
    greedy = SamplingParams(greedy=True)
    assert list(generate(runtime, "ROMEO:", 40, greedy))[-1].sequence.generated == \
        list(generate(new, "ROMEO:", 40, greedy))[-1].sequence.generated
    with pytest.raises(ExportError, match="has no fused model: export with `python -m export RUN_DIR DIR --optimize`"):
        OnnxModel(old, variant="fused")


def test_a_manifest_that_misdescribes_the_cache_is_refused(export_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    for graphs, message in (({**manifest["graphs"], "fused": {"cache": "paged"}}, "'graphs' must describe"),
                            ({k: v for k, v in manifest["graphs"].items() if k != "fused"}, "no 'graphs' entry")):
        (bad / "manifest.json").write_text(json.dumps({**manifest, "graphs": graphs}))
        with pytest.raises(ExportError, match=message):
            OnnxModel(bad, variant="fused")


@pytest.mark.slow
def test_a_fused_graph_that_fails_parity_is_not_written(run_dir, tmp_path, monkeypatch):
    import export.pipeline as pipeline

    real = pipeline.build_fused

    def wrong(model, path, **kwargs):  # a fault in the graph writer: one weight off
        broken = copy.deepcopy(model)
        broken.blocks[1].mlp.proj.weight.data *= 1.01
        return real(broken, path, **kwargs)

    monkeypatch.setattr(pipeline, "build_fused", wrong)
    with pytest.raises(ExportError, match="the fused graph and PyTorch disagree.*export without --optimize"):
        pipeline.export(run_dir, tmp_path / "out", optimize=True, log=lambda s: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_validation_loss_is_the_same_through_either_graph(run_dir, export_dir):
    from export.verify import validation_loss, validation_windows
    from gpt.checkpoint import resolve_checkpoint

    windows, _ = validation_windows(resolve_checkpoint(run_dir, "best"), 32, 8)
    losses = [validation_loss(OnnxModel(export_dir, variant=v, threads=1), windows) for v in ("fp32", "fused")]
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 1e-5


def test_an_onnxruntime_that_cannot_load_the_fused_graph_says_so_in_one_line(export_dir, tmp_path):
    import onnx
    from onnx import helper

    copy_dir = tmp_path / "newer"
    shutil.copytree(export_dir, copy_dir)
    model = onnx.load(str(copy_dir / "model.fused.onnx"))
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attention.attribute.append(helper.make_attribute("an_attribute_of_a_later_release", 1))
    onnx.save(model, str(copy_dir / "model.fused.onnx"))
    with pytest.raises(ExportError, match=r"cannot load the fused graph model.fused.onnx .*use the portable graph "
                                          r"\(--model fp32\)") as error:
        OnnxModel(copy_dir, variant="fused")
    assert "\n" not in str(error.value)
    assert OnnxModel(copy_dir, variant="fp32").variant == "fp32"


@pytest.mark.slow
@pytest.mark.parametrize("bias, tie", [(False, False), (True, True)], ids=["no-bias", "tied-head"])
def test_models_without_biases_or_with_a_tied_head_pass_the_same_gates(tmp_path, bias, tie):
    import torch

    from bench.common import VOCAB  # TinyShakespeare's characters: the run's held-out split measures int4
    from export.pipeline import export
    from gpt.checkpoint import write_model_files
    from gpt.config import ModelConfig, RunConfig
    from gpt.model import GPT
    from gpt.tokenizer import CharTokenizer

    config = ModelConfig(block_size=16, embedding_dim=32, num_heads=2, num_layers=2, vocab_size=len(VOCAB), bias=bias,
                         tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # weights far from their init, so a wrongly placed bias or gain would show
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    run = RunConfig()
    run.model = config
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", model, CharTokenizer(VOCAB), {"step": 0}, run.to_dict())
    manifest = export(tmp_path / "ckpt", tmp_path / "out", optimize=True, int4=True, log=lambda s: None)
    assert manifest["parity"]["fused"]["passed"] and manifest["parity"]["fused_greedy"]["identical"]
    assert ("Add" in manifest["graphs"]["fused"]["ops"]) == bias  # the QKV bias, when there is one
    assert abs(manifest["quality"]["fused-int4"]["val_loss_change"]) < 0.1
    runtime = OnnxModel(tmp_path / "out", variant="fused-int4")
    assert len(list(generate(runtime, "abc", 40, SamplingParams(greedy=True)))[-1].sequence.generated) == 40
    for variant in ("int4", "fused-int4"):
        _assert_tables_quantized(tmp_path / "out" / manifest["files"][variant], tie)


def _assert_tables_quantized(path, tie: bool) -> None:
    """No fp32 table is left: every Gather of a table is GatherBlockQuantized; a tied head reads the
    token table's 4-bit blocks (the very initializer its GatherBlockQuantized reads, through a
    Reshape) and an untied table, like the positions, is 8-bit."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    tables = []
    for n in graph.node:
        if n.op_type == "GatherBlockQuantized":
            reshape = producers[n.input[0]]
            assert reshape.op_type == "Reshape" and reshape.input[0] in inits
            tables.append((reshape.input[0], {a.name: a.i for a in n.attribute}["bits"]))
    head = next(n for n in graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits"
    shared = [(name, bits) for name, bits in tables if name == head.input[1]]
    assert len(tables) == 2 and len(shared) == (1 if tie else 0)
    assert sorted(bits for _, bits in tables) == ([4, 8] if tie else [8, 8])


@pytest.mark.parametrize("width, block4, block8", [(32, 32, 32), (96, 32, 32), (64, 64, 64), (384, 64, 128),
                                                   (768, 64, 256), (24, None, None)])
def test_the_nbits_block_is_64_at_4_bits_and_up_to_256_at_8_where_the_width_allows(width, block4, block8):
    from export.variants import nbits_block

    assert nbits_block(width) == nbits_block(width, 4) == block4
    assert nbits_block(width, 8) == block8
