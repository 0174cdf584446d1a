"""A checkpoint to a verified ONNX export folder, as a list of named steps.

    export()   load the checkpoint → trace the portable graph and check it (export/graph.py) →
               verify it against PyTorch: the parity grid and 200 greedy tokens (export/verify.py) →
               (--optimize) the fused graph from the same weights (export/fused.py), through the same
               gates → genai_config.json (export/genai.py) → int8 / int4 / int8-weights / fp16 variants
               (export/variants.py) with their validation-loss change → manifest.json, written once →
               publish the folder (export/destination.py)

The folder is built in a staging folder beside EXPORT_DIR (gpt.files.staging), flushed to disk and
renamed at the end, so a failed export leaves nothing behind. The runtime checks each graph from the
manifest held in memory, so manifest.json is written once, complete, at the end.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from export import onnxfile
from export.destination import check_destination, publish
from export.fused import FUSED_OPS, build_fused
from export.genai import write_genai_config
from export.graph import check_graph, example_inputs, trace
from export.onnxfile import EXTERNAL_DATA_ABOVE
from export.variants import NBITS_ACCURACY, NBITS_BLOCK, write_variant
from export.verify import (
    FP32_TOLERANCE,
    QUANTIZED_LOSS_WARNING,
    greedy_parity,
    parity_grid,
    require,
    shared_parity_grid,
    torch_validation_loss,
    validation_loss,
    validation_windows,
)
from gpt.checkpoint import load_checkpoint, resolve_checkpoint
from gpt.files import sha256_file, staging
from gpt.model import GPT
from gpt.tokenizer import tokenizer_sha256
from serve.manifest import DEFAULT_OPSET, EVAL_TOKENS, FORMAT, FORMAT_VERSION, VARIANT_FLAGS, VARIANTS, ExportError
from serve.runtime import OnnxModel


def export(source: str | Path, export_dir: str | Path, *, int8: bool = False, fp16: bool = False,
           int4: bool = False, int8_weights: bool = False, optimize: bool = False, opset: int = DEFAULT_OPSET,
           force: bool = False, eval_tokens: int = EVAL_TOKENS, checkpoint: str = "best", exporter: str = "dynamo",
           external_data_above: int = EXTERNAL_DATA_ABOVE, log: Callable[[str], None] = print) -> dict:
    """Export a run's best (or latest) checkpoint, or a checkpoint folder, to `export_dir`; returns the manifest.

    Each graph is NAME.onnx, with its weights in NAME.onnx.data when they pass `external_data_above`
    bytes (default: what protobuf allows). Each session is closed when its gate is passed, so at most
    one graph's weights are held beside the PyTorch model's."""
    export_dir = Path(export_dir)
    folder = resolve_checkpoint(source, checkpoint)
    check_destination(export_dir, folder, force)
    model, tokenizer, meta = load_checkpoint(folder)
    model.float().eval()
    if (int4 or int8_weights) and model.config.embedding_dim % NBITS_BLOCK:
        raise ExportError(f"--int4 and --int8-weights quantize in blocks of {NBITS_BLOCK} inputs, and this model's "
                          f"embedding_dim is {model.config.embedding_dim}: use --int8 (dynamic) instead")
    options = {"int8": int8, "fp16": fp16, "int4": int4, "int8_weights": int8_weights, "optimize": optimize,
               "opset": opset, "external_data_above": external_data_above}
    started, timings = time.time(), {}
    with staging(export_dir) as tmp:
        with timed(timings, "trace"):
            exporter = trace(model, tmp / VARIANTS["fp32"], opset, exporter, external_data_above)
            graph = settle(tmp / VARIANTS["fp32"], external_data_above)
        log(f"exported {folder} with the {exporter} exporter: {graph['nodes']} nodes, opset {graph['opset']}"
            f"{data_note(tmp / VARIANTS['fp32'])}")
        manifest = describe(model, tokenizer, meta, folder, checkpoint, graph, exporter, options,
                            tmp / VARIANTS["fp32"])
        manifest["timings"] = timings
        tokenizer.save(tmp / "tokenizer.json")
        verify_portable(model, tmp, manifest, log)
        if optimize:
            add_fused(model, tmp, manifest, external_data_above, log)
        manifest["genai"] = write_genai_config(tmp, manifest, tokenizer)
        wanted = [v for v, flag in (("int8", int8), ("fp16", fp16), ("int4", int4), ("int8w", int8_weights)) if flag]
        variants = wanted + ([f"fused-{v}" for v in wanted] if optimize else [])
        if variants:
            manifest["quality"] = add_variants(model, tmp, manifest, folder, variants, eval_tokens,
                                               external_data_above, log)
        manifest["export_seconds"] = round(time.time() - started, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish(tmp, export_dir, folder, force, kind="onnx")
    return manifest


def describe(model: GPT, tokenizer, meta: dict, folder: Path, which: str, graph: dict, exporter: str,
             options: dict, path: Path) -> dict:
    """The manifest: what the folder holds and where it came from (each step adds its results)."""
    import onnxruntime

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": asdict(model.config),
        "tokenizer": {"kind": tokenizer.kind, "file": "tokenizer.json", "sha256": tokenizer_sha256(tokenizer),
                      "eot_id": tokenizer.eot_id},
        "inputs": graph["inputs"], "outputs": graph["outputs"], "opset": graph["opset"], "dtype": "float32",
        "files": {"fp32": VARIANTS["fp32"]},
        "graphs": {"fp32": graph_entry(graph, "concat", "float32", path)},
        "export_options": {**options, "exporter": exporter, "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__},
        "source": {"checkpoint": str(folder), "step": meta.get("step"), "selected": which,
                   "val_loss": meta.get("val_loss") if meta.get("evaluated_at") == meta.get("step") else None,
                   "model_sha256": sha256_file(folder / "model.safetensors")},
    }


def graph_entry(graph: dict, cache: str, cache_dtype: str, path: Path) -> dict:
    """A model file's line in the manifest's `graphs`: its kind of cache, the ops it uses, and its
    files (the graph, and its external data file if it has one) with their sizes and sha256."""
    return {"cache": cache, "cache_dtype": cache_dtype, "nodes": graph["nodes"], "ops": graph["ops"],
            "files": onnxfile.describe_files(path)}


def settle(path: Path, external_data_above: int) -> dict:
    """Check a graph just written (its weights still in NAME.onnx.data, so the checker reads none of
    them), then pack them into NAME.onnx if they are under the threshold; returns check_graph's report."""
    graph = check_graph(path)
    onnxfile.finish(path, external_data_above)
    return graph


@contextlib.contextmanager
def timed(timings: dict, step: str):
    """Record a step's wall seconds in the manifest's `timings`."""
    clock = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - clock, 1)


def release_memory() -> None:
    """Give a closed session's memory back to the system before the next graph is opened: collect it,
    and (glibc) return the freed heap, which malloc would otherwise keep for this process."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the next session instead
        pass


def data_note(path: Path) -> str:
    data = onnxfile.data_file(path)
    return f" (weights in {data.name}, {data.stat().st_size / 2**30:.2f} GiB)" if data.is_file() else ""


def verify_portable(model: GPT, tmp: Path, manifest: dict, log: Callable[[str], None]) -> None:
    """The parity grid and greedy identity; a graph that fails either is not written."""
    with timed(manifest["timings"], "verify"):
        runtime = OnnxModel(tmp, threads=0, manifest=manifest)
        parity = parity_grid(model, runtime)
        greedy = greedy_parity(model, runtime)
    manifest["parity"] = {"fp32": parity, "greedy": greedy}
    log(f"parity: {parity['cases']} cases, max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} "
        f"(tolerance {FP32_TOLERANCE:.0e}); greedy {greedy['tokens']} tokens identical: {greedy['identical']}")
    del runtime
    release_memory()
    require(parity, greedy, "ONNX Runtime", "the export is not usable")


def add_fused(model: GPT, tmp: Path, manifest: dict, external_data_above: int, log: Callable[[str], None]) -> None:
    """Write the fused graph (export/fused.py) and hold it to the portable graph's gates: the parity grid
    (with ragged rows, as its batches run) and 200 greedy tokens identical to PyTorch."""
    path = tmp / VARIANTS["fused"]
    with timed(manifest["timings"], "fused"):
        build_fused(model, path, opset=manifest["opset"])
        graph = settle(path, external_data_above)
    manifest["files"]["fused"] = VARIANTS["fused"]
    manifest["graphs"]["fused"] = graph_entry(graph, "shared", "float32", path)
    try:
        with timed(manifest["timings"], "verify fused"):
            runtime = OnnxModel(tmp, variant="fused", manifest=manifest)
            parity, greedy = shared_parity_grid(model, runtime), greedy_parity(model, runtime)
    except Exception as e:  # onnxruntime refusing the graph is a failed gate too, reported in one line
        raise ExportError(f"onnxruntime could not run the fused graph ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); export without "
                          "--optimize") from None
    manifest["parity"]["fused"], manifest["parity"]["fused_greedy"] = parity, greedy
    del runtime
    release_memory()
    fused = ", ".join(f"{graph['ops'].get(op, 0)} {op}" for op in FUSED_OPS)
    log(f"fused graph: {graph['nodes']} nodes ({fused}); parity: {parity['cases']} cases, max |Δlogits|/scale "
        f"{parity['max_rel_logit_error']:.2e}; greedy {greedy['tokens']} tokens identical: {greedy['identical']}")
    require(parity, greedy, "the fused graph", "export without --optimize")


def add_variants(model: GPT, tmp: Path, manifest: dict, folder: Path, variants: list[str], eval_tokens: int,
                 external_data_above: int, log: Callable[[str], None]) -> dict:
    """Write each quantized variant, check its logits are finite, and measure its validation-loss change
    on `eval_tokens` held-out tokens against the PyTorch model's (which the fp32 graphs match)."""
    with timed(manifest["timings"], "verify baseline"):
        windows, why = validation_windows(folder, model.config.block_size, eval_tokens)
        base = torch_validation_loss(model, windows) if windows is not None else None
    quality = {"fp32_val_loss": base, "windows": 0 if windows is None else len(windows),
               "tokens": 0 if windows is None else int(windows[:, 1:].size)}
    for variant in variants:
        fused, kind = variant.startswith("fused-"), variant.removeprefix("fused-")
        with timed(manifest["timings"], variant):
            path = write_variant(model, tmp, variant, manifest["opset"])
            graph = settle(path, external_data_above)
        manifest["files"][variant] = VARIANTS[variant]
        manifest["graphs"][variant] = graph_entry(graph, "shared" if fused else "concat",
                                                  "float16" if fused and kind == "fp16" else "float32", path)
        quantized = OnnxModel(tmp, variant=variant, manifest=manifest)
        probe = quantized.run(*[a.numpy() for a in example_inputs(model, 2, 4, 0)[:3]], quantized.empty_cache(2))[0]
        if not np.isfinite(probe).all():
            raise ExportError(f"the {variant} model produces NaN/inf logits; export without {VARIANT_FLAGS[variant]}")
        entry = {"file": VARIANTS[variant]}
        if kind in ("int4", "int8w"):
            entry |= {"op": "MatMulNBits", "block_size": NBITS_BLOCK, "accuracy_level": NBITS_ACCURACY}
        with timed(manifest["timings"], f"verify {variant}"):
            quality[variant] = entry | variant_quality(quantized, windows, base, why, variant, log)
        del quantized  # one session at a time
        release_memory()
    return quality


def variant_quality(quantized: OnnxModel, windows: np.ndarray | None, base: float | None, why: str, variant: str,
                    log: Callable[[str], None]) -> dict:
    """A variant's validation loss and its change against fp32, with a warning past QUANTIZED_LOSS_WARNING."""
    if windows is None:
        log(f"{variant}: validation loss not measured: {why}")
        return {"val_loss": None, "note": why}
    loss = validation_loss(quantized, windows)
    log(f"{variant}: validation loss {loss:.4f} vs fp32 {base:.4f} ({loss - base:+.4f} nats)")
    if loss - base > QUANTIZED_LOSS_WARNING:
        log(f"warning: {variant} raises validation loss by {loss - base:.3f} nats "
            f"(> {QUANTIZED_LOSS_WARNING}); prefer the fp32 model where quality matters")
    return {"val_loss": loss, "val_loss_change": loss - base}
