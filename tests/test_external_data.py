"""Graphs past protobuf's 2 GB: each is NAME.onnx plus one NAME.onnx.data. A tiny model takes the same
path with a threshold of 0 bytes (the BPE export fixture is written that way)."""

import json
import shutil

import pytest

from conftest import TINY, command, within_tolerance_of_fp32
from export import onnxfile
from export.graph import trace
from export.pipeline import export
from gpt.checkpoint import load_checkpoint
from serve.manifest import VARIANTS, ExportError, read_manifest
from serve.runtime import OnnxModel


def test_each_graph_is_its_file_and_one_data_file_named_in_the_manifest(bpe_export_dir):
    manifest = read_manifest(bpe_export_dir)
    names = sorted(p.name for p in bpe_export_dir.iterdir())
    graphs = sorted(manifest["files"].values())
    assert graphs == sorted(VARIANTS[v] for v in ("fp32", "int8", "int4", "fused", "fused-int8", "fused-int4"))
    assert sorted(n for n in names if ".onnx" in n) == sorted([*graphs, *(f"{g}.data" for g in graphs)])
    for variant, name in manifest["files"].items():
        entry = manifest["graphs"][variant]["files"]
        data = bpe_export_dir / f"{name}.data"
        assert entry["data"] == {"file": data.name, "bytes": data.stat().st_size,
                                 "sha256": onnxfile.describe_files(bpe_export_dir / name)["data"]["sha256"]}
        assert entry["bytes"] == (bpe_export_dir / name).stat().st_size
        # the graph file holds no weight bigger than the inline limit: they are all in the data file
        proto = onnxfile.load(bpe_export_dir / name, weights=False)
        assert all(len(t.raw_data) < onnxfile.INLINE_BELOW for t in proto.graph.initializer)
        assert sum(1 for t in proto.graph.initializer if t.external_data) > 0
    assert manifest["export_options"]["external_data_above"] == 0


def test_the_fused_graph_streams_its_weights_aligned_for_mapping(bpe_export_dir):
    proto = onnxfile.load(bpe_export_dir / VARIANTS["fused"], weights=False)
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % onnxfile.ALIGN == 0 for o in offsets)


def test_a_truncated_or_missing_data_file_is_one_line(bpe_export_dir, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(bpe_export_dir, dest)
    data = dest / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ExportError, match=r"model.onnx.data has \d+ bytes, the manifest recorded \d+: the copy is "
                                          "incomplete"):
        OnnxModel(dest)
    data.unlink()
    with pytest.raises(ExportError, match="model.onnx.data is missing: model.onnx keeps its weights there"):
        OnnxModel(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["graphs"]["fused"]["files"]["data"]["file"] = "../elsewhere.data"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="data file must be model.fused.onnx.data"):
        OnnxModel(dest, variant="fused")


def test_force_replaces_the_whole_set_leaving_no_data_file_behind(bpe_run_dir, bpe_export_dir, tmp_path):
    dest = tmp_path / "exp"
    shutil.copytree(bpe_export_dir, dest)
    export(bpe_run_dir, dest, force=True, log=lambda s: None)  # the default threshold: one file per graph
    assert sorted(p.name for p in dest.iterdir()) == ["genai_config.json", "manifest.json", "model.onnx",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert "data" not in read_manifest(dest)["graphs"]["fp32"]["files"]


def test_the_torchscript_exporter_only_when_asked_and_still_two_files(bpe_run_dir, tmp_path, monkeypatch):
    model, _, _ = load_checkpoint(bpe_run_dir)
    path = tmp_path / "model.onnx"
    assert trace(model.float().eval(), path, 18, "torchscript", external_data_above=0) == "torchscript"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]

    import export.graph

    def broken(*args):
        raise RuntimeError("something the dynamo exporter cannot trace")

    monkeypatch.setattr(export.graph, "_dynamo", broken)
    with pytest.raises(ExportError, match=r"the dynamo exporter failed \(RuntimeError: something the dynamo "
                                          r"exporter cannot trace\); export with --exporter torchscript"):
        trace(model, tmp_path / "other.onnx", 18)


def test_a_stale_data_file_from_an_earlier_attempt_is_replaced(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
                              [numpy_helper.from_array(np.ones(4096, np.float32), "w")])
    model = helper.make_model(graph)
    path = tmp_path / "g.onnx"
    onnxfile.data_file(path).write_bytes(b"stale" * 100_000)
    assert onnxfile.save(model, path, external_data_above=0) == onnxfile.data_file(path)
    assert onnxfile.data_file(path).stat().st_size == 4096 * 4
    assert onnxfile.save(model, path) is None and not onnxfile.data_file(path).exists()


def test_every_variant_takes_the_external_data_path(run_dir, tmp_path):
    """fp16, int8 weights and their fused twins (the BPE fixture covers int8 and int4) past a 0-byte threshold,
    each scoring held-out text within its tolerance of fp32 (fp16 on the CPU too)."""
    dest = tmp_path / "all"
    manifest = export(run_dir, dest, fp16=True, int8_weights=True, optimize=True, external_data_above=0,
                      eval_tokens=256, log=lambda s: None)
    for variant in ("fp16", "int8w", "fused", "fused-fp16", "fused-int8w"):
        name = manifest["files"][variant]
        assert (dest / f"{name}.data").is_file() and manifest["graphs"][variant]["files"]["data"]["bytes"] > 0, variant
        if variant == "fused-fp16":  # fp16 GroupQueryAttention is a CUDA kernel: checked on a GPU (tests/test_gpu.py)
            continue
        within_tolerance_of_fp32(dest, variant)  # read from the .data files
    assert sorted(p.name for p in dest.iterdir() if not p.name.endswith((".onnx", ".onnx.data"))) == [
        "manifest.json", "tokenizer.json"]


def test_a_llama_takes_the_external_data_path_too(tmp_path):
    """The Llama family past a 0-byte threshold: each graph, portable and fused, fp32 and int4, is its file and
    one .data file, and scores held-out text within its tolerance of fp32."""
    run = tmp_path / "run"
    command("launch", str(TINY), f"--train.out_dir={run}", "--train.max_iters=20", "--model.arch=llama",
            "--model.num_kv_heads=2")
    manifest = export(run, tmp_path / "out", int4=True, optimize=True, external_data_above=0, eval_tokens=256,
                      log=lambda s: None)
    for variant in ("fp32", "fused", "int4", "fused-int4"):
        name = manifest["files"][variant]
        assert (tmp_path / "out" / f"{name}.data").is_file(), variant
        if variant != "fp32":
            within_tolerance_of_fp32(tmp_path / "out", variant)


def test_a_big_model_is_traced_in_a_process_of_its_own_and_released_before_the_gates(run_dir, tmp_path, monkeypatch):
    """Past TRACE_APART_ABOVE (0 here) the trace runs in a spawned process: the export is the same, and
    a failure there is the same one line here."""
    from export import pipeline

    monkeypatch.setattr(pipeline, "TRACE_APART_ABOVE", 0)
    # the TorchScript exporter: the same path as dynamo's (test_portable traces with dynamo) in a third of the time
    manifest = export(run_dir, tmp_path / "apart", exporter="torchscript", log=lambda s: None)
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["greedy"]["identical"]
    assert manifest["export_options"]["exporter"] == "torchscript" and "trace" in manifest["timings"]
    from export.graph import trace_checkpoint
    from gpt.checkpoint import resolve_checkpoint

    with pytest.raises(ExportError, match=r"^--exporter 'nope' does not trace: use one of dynamo, torchscript$"):
        trace_checkpoint(resolve_checkpoint(run_dir), tmp_path / "bad.onnx", 18, "nope")
    with pytest.raises(ExportError, match=r"^--exporter 'nope' is unknown: use one of builder, dynamo, "
                                          r"torchscript$") as e:  # and before anything runs
        export(run_dir, tmp_path / "bad", exporter="nope", log=lambda s: None)
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()
