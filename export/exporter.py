"""A checkpoint to a verified ONNX export folder.

    export()   load the checkpoint → trace one graph for prefill and decode → onnx checker →
               parity against PyTorch on a grid of shapes → 200 greedy tokens identical →
               (--optimize) the fused graph from the same weights, through the same two gates →
               optional int8 / int4 / fp16 variants with their validation-loss change → manifest.json

The graph has no `If` node: a zero-length past is the prefill case. The folder is built under a
temporary name, flushed to disk and renamed at the end, so a failed export leaves nothing behind.
`--force` replaces only an earlier export folder, by renaming it aside, renaming the new one into
place and then deleting the old: never a folder that holds the checkpoint or anything else.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from export.fused import FUSED_OPS, build_fused, fold_matmul_bias
from gpt.checkpoint import load_checkpoint, resolve_checkpoint
from gpt.data import sha256_file
from gpt.files import publish_folder
from gpt.generate import generate as torch_generate
from gpt.model import GPT
from gpt.sampling import SamplingParams
from gpt.tokenizer import EOT, tokenizer_sha256
from serve.manifest import (
    DEFAULT_OPSET,
    FORMAT,
    FORMAT_VERSION,
    VARIANT_FLAGS,
    VARIANTS,
    ExportError,
    input_names,
    output_names,
)
from serve.runtime import OnnxModel
from serve.runtime import generate as ort_generate

FP32_TOLERANCE = 1e-4  # max |Δlogits| / max |logits|
QUANTIZED_LOSS_WARNING = 0.05  # nats of validation loss


class ExportGraph(nn.Module):
    """The graph's signature: named tensors in, named tensors out, in the Optimum convention."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        past = [(k, v) for k, v in past_key_values]
        out = self.model(input_ids, past=past, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True)
        return out.logits, [(k, v) for k, v in out.present]


def example_inputs(model: GPT, batch: int, seq: int, past: int, left_pad: int = 0, seed: int = 0):
    """Inputs for the graph: `past` cached tokens and `seq` new ones, the first `left_pad` of them padding."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[:, :left_pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    cache = [(torch.randn(batch, c.num_heads, past, c.head_dim, generator=g),
              torch.randn(batch, c.num_heads, past, c.head_dim, generator=g)) for _ in range(c.num_layers)]
    return ids, mask, positions, cache


def _torch_export(model: GPT, path: Path, opset: int) -> str:
    """Trace with the dynamo exporter (TorchScript as the fallback); returns which one worked."""
    from torch.export import Dim

    L = model.config.num_layers
    graph = ExportGraph(model).eval()
    # example sizes for dynamic dims must not be 0 or 1, or the exporter specialises on them
    args = example_inputs(model, batch=2, seq=3, past=4)
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    cache_shape = {0: batch, 2: past}
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},  # past + sequence: related by the graph itself
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [(cache_shape, cache_shape) for _ in range(L)],
    }
    names = dict(input_names=input_names(L), output_names=output_names(L))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(graph, (args[0], args[1], args[2], args[3]), str(path), dynamo=True,
                              external_data=False, dynamic_shapes=dynamic_shapes, opset_version=opset,
                              optimize=True, **names)
        _name_mask_dim(path)
        return "dynamo"
    except Exception as e:  # the TorchScript exporter is the fallback
        first_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in names["input_names"][3:]:
        axes[n] = {0: "batch", 2: "past_sequence"}
    for n in names["output_names"][1:]:
        axes[n] = {0: "batch", 2: "total_sequence"}
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (args[0], args[1], args[2], args[3]), str(path), dynamo=False,
                              dynamic_axes=axes, opset_version=opset, **names)
        return f"torchscript (dynamo failed: {first_error})"
    except Exception as e:
        raise ExportError(f"both ONNX exporters failed: dynamo: {first_error}; torchscript: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _name_mask_dim(path: Path) -> None:
    """Give attention_mask's length the name the exporter gave the present outputs' length."""
    import onnx

    model = onnx.load(str(path))
    dim = next(i for i in model.graph.input if i.name == "attention_mask").type.tensor_type.shape.dim[1]
    old, new = dim.dim_param, "past_sequence + sequence"
    if not old or old == new:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = new
    onnx.save(model, str(path))


def check_graph(path: Path) -> dict:
    """onnx's full checker, and the promise that prefill and decode share one graph without `If`."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    ops: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)

    walk(model.graph)
    if "If" in ops:
        raise ExportError(f"{path.name} has {ops['If']} If node(s): the export must be one straight graph")

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [{"name": v.name, "shape": shape(v)} for v in model.graph.input],
        "outputs": [{"name": v.name, "shape": shape(v)} for v in model.graph.output],
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
    }


PARITY_GRID = [(b, p, t, pad) for b in (1, 2, 3) for p in (0, 1, 5) for t in (1, 4) for pad in (False, True)]


def parity_grid(model: GPT, runtime: OnnxModel) -> dict:
    """ORT against PyTorch over batch 1-3, past 0/1/5, sequence 1/4, with and without left padding."""
    worst, cases = 0.0, []
    for batch, past, seq, pad in PARITY_GRID:
        left_pad = min(2, past + seq - 1) if pad else 0
        ids, mask, positions, cache = example_inputs(model, batch, seq, past, left_pad, seed=len(cases))
        if pad and batch > 1:
            mask[0, :] = 1  # the first row unpadded, the others padded: a real mixed batch
            positions[0] = torch.arange(past, past + seq)
        with torch.no_grad():
            ref = model(ids, past=cache, attention_mask=mask, position_ids=positions, use_cache=True)
        host = [t.numpy() for kv in cache for t in kv]
        logits, present = runtime.run(ids.numpy(), mask.numpy(), positions.numpy(), runtime.to_device(host))
        scale = float(ref.logits.abs().max())
        err = float(np.abs(logits - ref.logits.numpy()).max()) / scale
        present_err = max(float(np.abs(p - t.numpy()).max()) for p, t in
                          zip(runtime.to_host(present), [t for kv in ref.present for t in kv]))
        worst = max(worst, err)
        cases.append({"batch": batch, "past": past, "sequence": seq, "left_padding": pad,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err})
    return {"cases": len(cases), "compared": _compared(model, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": worst <= FP32_TOLERANCE, "grid": cases}


def _compared(model: GPT, runtime: OnnxModel) -> str:
    """What a parity grid compared, in which precision: TF32 would blur a 1e-4 gate on a GPU."""
    precision = "fp16" if runtime.cache_dtype == np.float16 else "fp32"
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 and next(model.parameters()).is_cuda
    return (f"{precision}: onnxruntime {runtime.session.get_providers()[0]} (TF32 {'on' if runtime.tf32 else 'off'}) "
            f"vs PyTorch on {next(model.parameters()).device.type}{' (TF32 on)' if cuda_tf32 else ''}")


# GroupQueryAttention runs a prompt (no past) in a batch, one token after a past in a batch (rows may
# hold different numbers of tokens), and a chunk after a past for batch 1 only.
SHARED_GRID = [(b, p, t, ragged) for b, p, t, ragged in PARITY_GRID
               if (p == 0 and not ragged) or t == 1 or (b == 1 and not ragged)]


def shared_parity_grid(model: GPT, runtime: OnnxModel) -> dict:
    """The fused graph against PyTorch over batch 1-3, past 0/1/5, sequence 1/4 (SHARED_GRID), with
    every row holding the same number of cached tokens or different numbers (right padding, as its
    batches run): logits, and the cache the graph wrote in place."""
    c = model.config
    worst, cases = 0.0, []
    for batch, past, seq, ragged in SHARED_GRID:
        pasts = [past + (2 * r if ragged else 0) for r in range(batch)]
        g = torch.Generator().manual_seed(len(cases))
        ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
        host = [np.zeros((batch, c.num_heads, max(pasts), c.head_dim), np.float32) for _ in range(2 * c.num_layers)]
        width = max(pasts) + seq
        mask, positions = np.zeros((batch, width), np.int64), np.zeros((batch, seq), np.int64)
        refs = []
        for r, p in enumerate(pasts):
            cache = [(torch.randn(1, c.num_heads, p, c.head_dim, generator=g),
                      torch.randn(1, c.num_heads, p, c.head_dim, generator=g)) for _ in range(c.num_layers)]
            for j, t in enumerate(t for kv in cache for t in kv):
                host[j][r, :, :p] = t[0].numpy()
            mask[r, :p + seq] = 1
            positions[r] = np.arange(p, p + seq)
            with torch.no_grad():
                refs.append(model(ids[r:r + 1], past=cache, use_cache=True))
        logits, view = runtime.run(ids.numpy(), mask, positions, runtime.to_device(host))
        written = runtime.to_host(view)
        err = present_err = 0.0
        for r, (p, ref) in enumerate(zip(pasts, refs)):
            err = max(err, float(np.abs(logits[r] - ref.logits[0].numpy()).max()) / float(ref.logits.abs().max()))
            for a, t in zip(written, [t for kv in ref.present for t in kv]):
                present_err = max(present_err, float(np.abs(a[r, :, :p + seq] - t[0].numpy()).max()))
        worst = max(worst, err)
        cases.append({"batch": batch, "past": past, "sequence": seq, "ragged": ragged,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err})
    passed = worst <= FP32_TOLERANCE and max(c["max_abs_cache_error"] for c in cases) <= FP32_TOLERANCE * 10
    return {"cases": len(cases), "compared": _compared(model, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": passed, "grid": cases}


def greedy_parity(model: GPT, runtime: OnnxModel, tokens: int = 200) -> dict:
    prompt = runtime.tokenizer.decode([i % runtime.vocab_size for i in range(1, 9)])
    ids = runtime.tokenizer.encode(prompt)
    ref = list(torch_generate(model, ids, tokens, SamplingParams(greedy=True), eot_id=runtime.tokenizer.eot_id))
    events = list(ort_generate(runtime, prompt, tokens, SamplingParams(greedy=True)))
    got = events[-1].sequence.generated
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    return {"tokens": tokens, "identical": ref == got, "first_difference": first}


def validation_loss(runtime: OnnxModel, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy of the model over fixed validation windows (N, block+1)."""
    total, count = 0.0, 0
    for chunk in np.array_split(windows, max(1, len(windows) // 4)):
        x, y = chunk[:, :-1], chunk[:, 1:]
        B, T = x.shape
        mask = np.ones((B, T), np.int64)
        positions = np.broadcast_to(np.arange(T), (B, T))
        logits, _ = runtime.run(x, mask, positions, runtime.empty_cache(B))
        logits = logits.astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total += -np.take_along_axis(logp, y[..., None], -1).sum()
        count += y.size
    return float(total / count)


def validation_windows(checkpoint: Path, block_size: int, count: int) -> tuple[np.ndarray | None, str]:
    """Fixed windows of the run's held-out split, or None and the reason it is unavailable."""
    from gpt.config import DataConfig
    from gpt.data import DataError, prepare

    try:
        data = DataConfig(**json.loads((checkpoint / "run_config.json").read_text())["data"])
        corpus = prepare(data)
    except (DataError, OSError, TypeError, KeyError) as e:
        return None, f"held-out data unavailable ({str(e).splitlines()[0][:200]})"
    val = corpus.val
    if len(val) <= block_size + 1:
        return None, f"held-out split has {len(val)} tokens, too few for one window"
    starts = np.linspace(0, len(val) - block_size - 1, count).astype(np.int64)
    return np.stack([np.asarray(val[s:s + block_size + 1], dtype=np.int64) for s in starts]), ""


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantization (weights int8, activations quantized per call), after
    its recommended pre-processing (shape inference and graph optimisation)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # DefaultTensorType: onnx's shape inference cannot type the outputs of com.microsoft ops (fused graph)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    pre.unlink()


# MatMulNBits settings, chosen by measurement on the CPU config: block 32 changed validation loss least
# (4 bits: +0.0061 nats at 32, +0.0056 at 64, +0.0079 at 128; 8 bits: +0.0001 at all three), and
# accuracy level 4 (int8 activations in the kernel) decoded fastest at seed size.
NBITS_BLOCK, NBITS_ACCURACY = 32, 4


def quantize_nbits(src: Path, dst: Path, bits: int) -> None:
    """Weight-only quantization of every MatMul with a constant weight to `bits` bits (MatMulNBits,
    symmetric, block NBITS_BLOCK); activations stay fp32."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
        config = DefaultWeightOnlyQuantConfig(block_size=NBITS_BLOCK, is_symmetric=True,
                                              accuracy_level=NBITS_ACCURACY, bits=bits)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 graph inputs and outputs (so callers need no change)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _topological_sort(model.graph)  # the converter appends its input casts after their users
    onnx.save(model, str(dst))


def _topological_sort(graph) -> None:
    """Reorder a graph's nodes so each comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the fp16 graph has a cycle or a dangling input; export without --fp16")
        for n in ready:
            available.update(n.output)
            ordered.append(n)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


HF_REPORT = "export_report.json"
HF_FORMAT = "gpt-hf"
HF_EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", HF_REPORT}


def check_destination(export_dir: Path, checkpoint: Path, force: bool, kind: str = "onnx") -> None:
    """Refuse a destination the export would destroy something in.

    A new or empty folder is fine. With `force`, so is an earlier export folder of the same kind:
    one whose manifest.json (ONNX) or export_report.json (transformers) is this toolkit's and which
    holds nothing but the files that export writes. Never a file, the checkpoint's own folder or one
    above it, or a folder with anything else.
    """
    dest, source = export_dir.resolve(), checkpoint.resolve()
    if dest == source or dest in source.parents:
        raise ExportError(f"{export_dir} holds the checkpoint being exported ({checkpoint}): choose another "
                          "EXPORT_DIR, e.g. exports/NAME")
    if not export_dir.exists():
        return
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir} is a file, not a folder: choose another EXPORT_DIR")
    entries = sorted(p.name for p in export_dir.iterdir())
    if not entries:
        return
    if not force:
        raise ExportError(f"{export_dir} exists and is not empty: pass --force to replace an earlier export, or "
                          "choose another EXPORT_DIR")
    marker, expected = ("manifest.json", FORMAT) if kind == "onnx" else (HF_REPORT, HF_FORMAT)
    try:
        manifest = json.loads((export_dir / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != expected:
        raise ExportError(f"{export_dir} is not an export folder (no {expected} {marker}), and --force replaces "
                          "only an earlier export of the same format: choose another EXPORT_DIR")
    if kind == "onnx":
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        ours = {"manifest.json", "tokenizer.json", "genai_config.json", "tokenizer_config.json"}
        ours |= {str(f) for f in files.values()}
        ours |= {f"{f}.data" for f in files.values()}
    else:
        ours = HF_EXPORT_FILES
    foreign = [name for name in entries if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"{export_dir} holds {shown}, which the export did not write; --force would delete it: "
                          "move it away, or choose another EXPORT_DIR")


def export(source: str | Path, export_dir: str | Path, *, int8: bool = False, fp16: bool = False,
           int4: bool = False, int8_weights: bool = False, optimize: bool = False, opset: int = DEFAULT_OPSET,
           force: bool = False, eval_windows: int = 32, checkpoint: str = "best",
           log: Callable[[str], None] = print) -> dict:
    """Export a run's best (or latest) checkpoint, or a checkpoint folder, to `export_dir`; returns the manifest.

    The steps: trace the graph and check it, write the manifest and tokenizer, verify against PyTorch,
    (optimize) write the fused graph and verify it the same way, add the quantized variants with their
    quality (each also from the fused graph when optimizing), publish the folder."""
    export_dir = Path(export_dir)
    folder = resolve_checkpoint(source, checkpoint)
    check_destination(export_dir, folder, force)
    model, tokenizer, meta = load_checkpoint(folder)
    model.float().eval()
    if (int4 or int8_weights) and model.config.embedding_dim % NBITS_BLOCK:
        raise ExportError(f"--int4 and --int8-weights quantize in blocks of {NBITS_BLOCK} inputs, and this model's "
                          f"embedding_dim is {model.config.embedding_dim}: use --int8 (dynamic) instead")
    started = time.time()
    with staging(export_dir) as tmp:
        exporter, graph = _trace(model, tmp, opset)
        log(f"exported {folder} with the {exporter} exporter: {graph['nodes']} nodes, opset {graph['opset']}")
        manifest = _describe(model, tokenizer, meta, folder, checkpoint, graph, exporter,
                             {"int8": int8, "fp16": fp16, "int4": int4, "int8_weights": int8_weights,
                              "optimize": optimize, "opset": opset})
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        runtime = _verify(model, tmp, manifest, log)
        if optimize:
            _add_fused(model, tmp, manifest, log)
        manifest["genai"] = _write_genai_config(tmp, manifest, tokenizer)
        wanted = (("int8", int8), ("fp16", fp16), ("int4", int4), ("int8w", int8_weights))
        variants = [v for v, flag in wanted if flag]
        variants += [f"fused-{v}" for v in variants] if optimize else []
        if variants:
            manifest["quality"] = _add_variants(model, runtime, tmp, manifest, folder, variants, eval_windows, log)
        manifest["export_seconds"] = round(time.time() - started, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _publish(tmp, export_dir, folder, force, kind="onnx")
    return manifest


@contextlib.contextmanager
def staging(export_dir: Path):
    """A temporary folder beside `export_dir` to build the export in; removed whatever happens."""
    tmp = export_dir.with_name(f".{export_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trace(model: GPT, tmp: Path, opset: int) -> tuple[str, dict]:
    exporter = _torch_export(model, tmp / VARIANTS["fp32"], opset)
    return exporter, check_graph(tmp / VARIANTS["fp32"])


def _describe(model: GPT, tokenizer, meta: dict, folder: Path, which: str, graph: dict, exporter: str,
              options: dict) -> dict:
    """The manifest: what the folder holds and where it came from."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": asdict(model.config),
        "tokenizer": {"kind": tokenizer.kind, "file": "tokenizer.json", "sha256": tokenizer_sha256(tokenizer),
                      "eot_id": tokenizer.eot_id},
        "inputs": graph["inputs"], "outputs": graph["outputs"], "opset": graph["opset"], "dtype": "float32",
        "files": {"fp32": VARIANTS["fp32"]},
        "graphs": {"fp32": {"cache": "concat", "cache_dtype": "float32", "nodes": graph["nodes"], "ops": graph["ops"]}},
        "export_options": {**options, "exporter": exporter, "torch": torch.__version__,
                           "onnxruntime": _onnxruntime_version()},
        "source": {"checkpoint": str(folder), "step": meta.get("step"), "selected": which,
                   "val_loss": meta.get("val_loss") if meta.get("evaluated_at") == meta.get("step") else None,
                   "model_sha256": sha256_file(folder / "model.safetensors")},
    }


def genai_config(manifest: dict, variant: str, eot_id: int | None) -> dict:
    """onnxruntime-genai's config for one model file of an export folder: model type `decoder`, the
    Optimum input and output names; a shared-cache (fused) graph gets past and present in one buffer,
    which GroupQueryAttention writes in place."""
    c = manifest["model"]
    shared = manifest.get("graphs", {}).get(variant, {}).get("cache") == "shared"
    names = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "type": "decoder", "vocab_size": c["vocab_size"], "context_length": c["block_size"],
            "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id,
            "decoder": {
                "filename": manifest["files"][variant],
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": c["embedding_dim"], "head_size": c["embedding_dim"] // c["num_heads"],
                "num_attention_heads": c["num_heads"], "num_key_value_heads": c["num_heads"],
                "num_hidden_layers": c["num_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           **names},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": c["block_size"],
                   "min_length": 0, "past_present_share_buffer": shared, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _write_genai_config(folder: Path, manifest: dict, tokenizer) -> dict:
    """genai_config.json (and the tokenizer_config.json it reads beside tokenizer.json), so that
    onnxruntime_genai.Model(EXPORT_DIR) runs the export as it is: the fused fp32 graph when there is
    one, else the portable graph. onnxruntime-genai reads Hugging Face tokenizers, so a char model gets
    none."""
    if tokenizer.kind != "bpe":
        return {"written": False, "note": "onnxruntime-genai needs a Hugging Face tokenizer: export a bpe model"}
    eot = tokenizer.eot_id
    variant = "fused" if "fused" in manifest["files"] else "fp32"
    config = genai_config(manifest, variant, eot)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2TokenizerFast", "add_prefix_space": False, **special}, indent=2))
    return {"written": True, "files": ["genai_config.json", "tokenizer_config.json", "tokenizer.json"],
            "model": VARIANTS[variant], "past_present_share_buffer": config["search"]["past_present_share_buffer"]}


def _verify(model: GPT, tmp: Path, manifest: dict, log: Callable[[str], None]) -> OnnxModel:
    """The parity grid and greedy identity; a graph that fails either is not written."""
    runtime = OnnxModel(tmp, threads=0)
    parity = parity_grid(model, runtime)
    greedy = greedy_parity(model, runtime)
    manifest["parity"] = {"fp32": parity, "greedy": greedy}
    log(f"parity: {parity['cases']} cases, max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} "
        f"(tolerance {FP32_TOLERANCE:.0e}); greedy {greedy['tokens']} tokens identical: {greedy['identical']}")
    _require(parity, greedy, "ONNX Runtime", "the export is not usable")
    return runtime


def _require(parity: dict, greedy: dict, graph: str, fix: str) -> None:
    """The two gates every graph passes before it is written."""
    if not parity["passed"]:
        raise ExportError(f"{graph} and PyTorch disagree: max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} > "
                          f"{FP32_TOLERANCE:.0e}; {fix}")
    if not greedy["identical"]:
        raise ExportError(f"{graph}'s greedy decoding differs from PyTorch at token {greedy['first_difference']} of "
                          f"{greedy['tokens']}; {fix}")


def _add_fused(model: GPT, tmp: Path, manifest: dict, log: Callable[[str], None]) -> None:
    """Write the fused graph (export/fused.py) and hold it to the portable graph's gates: the parity grid
    (with ragged rows, as its batches run) and 200 greedy tokens identical to PyTorch."""
    path = tmp / VARIANTS["fused"]
    build_fused(model, path, opset=manifest["opset"])
    graph = check_graph(path)
    manifest["files"]["fused"] = VARIANTS["fused"]
    manifest["graphs"]["fused"] = {"cache": "shared", "cache_dtype": "float32", "nodes": graph["nodes"],
                                   "ops": graph["ops"]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        runtime = OnnxModel(tmp, variant="fused")
        parity, greedy = shared_parity_grid(model, runtime), greedy_parity(model, runtime)
    except Exception as e:  # onnxruntime refusing the graph is a failed gate too, reported in one line
        raise ExportError(f"onnxruntime could not run the fused graph ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); export without "
                          "--optimize") from None
    manifest["parity"]["fused"], manifest["parity"]["fused_greedy"] = parity, greedy
    fused = ", ".join(f"{graph['ops'].get(op, 0)} {op}" for op in FUSED_OPS)
    log(f"fused graph: {graph['nodes']} nodes ({fused}); parity: {parity['cases']} cases, max |Δlogits|/scale "
        f"{parity['max_rel_logit_error']:.2e}; greedy {greedy['tokens']} tokens identical: {greedy['identical']}")
    _require(parity, greedy, "the fused graph", "export without --optimize")


def _add_variants(model: GPT, runtime: OnnxModel, tmp: Path, manifest: dict, folder: Path, variants: list[str],
                  eval_windows: int, log: Callable[[str], None]) -> dict:
    """Write each quantized variant, check its logits are finite, and measure its validation-loss change."""
    windows, why = validation_windows(folder, model.config.block_size, eval_windows)
    base = validation_loss(runtime, windows) if windows is not None else None
    quality = {"fp32_val_loss": base, "windows": 0 if windows is None else len(windows)}
    makers = {"int8": quantize_int8, "fp16": convert_fp16, "int4": functools.partial(quantize_nbits, bits=4),
              "int8w": functools.partial(quantize_nbits, bits=8)}
    for variant in variants:
        fused = variant.startswith("fused-")
        kind = variant.removeprefix("fused-")
        source, target = tmp / VARIANTS["fused" if fused else "fp32"], tmp / VARIANTS[variant]
        if fused and kind == "fp16":  # written directly: GroupQueryAttention's cache must be fp16 too
            build_fused(model, target, opset=manifest["opset"], dtype="float16")
        else:
            makers[kind](source, target)
            if fused and kind in ("int4", "int8w"):
                fold_matmul_bias(target)
        graph = check_graph(target)
        manifest["files"][variant] = VARIANTS[variant]
        manifest["graphs"][variant] = {"cache": "shared" if fused else "concat",
                                       "cache_dtype": "float16" if fused and kind == "fp16" else "float32",
                                       "nodes": graph["nodes"], "ops": graph["ops"]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        quantized = OnnxModel(tmp, variant=variant)
        probe = quantized.run(*[a.numpy() for a in example_inputs(model, 2, 4, 0)[:3]], quantized.empty_cache(2))[0]
        if not np.isfinite(probe).all():
            raise ExportError(f"the {variant} model produces NaN/inf logits; export without {VARIANT_FLAGS[variant]}")
        entry = {"file": VARIANTS[variant]}
        if kind in ("int4", "int8w"):
            entry |= {"op": "MatMulNBits", "block_size": NBITS_BLOCK, "accuracy_level": NBITS_ACCURACY}
        if windows is None:
            entry |= {"val_loss": None, "note": why}
            log(f"{variant}: validation loss not measured: {why}")
        else:
            loss = validation_loss(quantized, windows)
            entry |= {"val_loss": loss, "val_loss_change": loss - base}
            log(f"{variant}: validation loss {loss:.4f} vs fp32 {base:.4f} ({loss - base:+.4f} nats)")
            if loss - base > QUANTIZED_LOSS_WARNING:
                log(f"warning: {variant} raises validation loss by {loss - base:.3f} nats "
                    f"(> {QUANTIZED_LOSS_WARNING}); prefer the fp32 model where quality matters")
        quality[variant] = entry
    return quality


def _publish(tmp: Path, export_dir: Path, folder: Path, force: bool, kind: str) -> None:
    check_destination(export_dir, folder, force, kind)  # again: the folder may have changed meanwhile
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    publish_folder(tmp, export_dir, replace=True)


def export_hf(source: str | Path, export_dir: str | Path, *, force: bool = False, checkpoint: str = "best",
              log: Callable[[str], None] = print) -> dict:
    """Write a checkpoint as a transformers GPT2LMHeadModel folder, checked against transformers when it
    is installed (logits within 1e-5 relative, 100 greedy tokens identical, no missing or unexpected keys)."""
    from gpt.hf import HFError, export_gpt2, parity_with_transformers

    export_dir = Path(export_dir)
    which = checkpoint
    checkpoint = resolve_checkpoint(source, which)
    check_destination(export_dir, checkpoint, force, kind="hf")
    model, tokenizer, meta = load_checkpoint(checkpoint)
    with staging(export_dir) as tmp:
        try:
            export_gpt2(model, tokenizer, tmp)
        except HFError as e:
            raise ExportError(str(e)) from None
        parity = parity_with_transformers(model, tmp)
        if parity["checked"]:
            log(f"transformers: logits within {parity['max_rel_logit_error']:.1e} (tolerance 1e-5), greedy "
                f"{parity['greedy_tokens']} tokens identical: {parity['greedy_identical']}")
            if not parity["passed"] or not parity["greedy_identical"] or parity["loading_problems"]:
                raise ExportError(f"transformers reads the folder differently ({parity}); it is not written")
        else:
            log(f"warning: {parity['note']}")
        report = {"format": HF_FORMAT, "source": {"checkpoint": str(checkpoint), "step": meta.get("step"),
                                                  "selected": which},
                  "parity": parity, "torch": torch.__version__}
        (tmp / HF_REPORT).write_text(json.dumps(report, indent=2))
        _publish(tmp, export_dir, checkpoint, force, kind="hf")
    return report
