"""A checkpoint to a verified ONNX export folder, as a list of named steps.

    export()   load the checkpoint → PyTorch's side of every gate, computed once (export/verify.py:
               the parity grids, the validation loss) → the portable graph, written
               from the weights (export/portable.py; or traced with --exporter dynamo|torchscript,
               export/graph.py) → (--optimize) the fused graph from the same weights (export/fused.py)
               → release the PyTorch model → int8 / int4 / int8-weights / fp16 variants from the graphs
               on disk (export/variants.py) → each graph through its gates, one onnxruntime session at
               a time → the model loaded again to check the fp32 graphs' 200 greedy tokens → pack
               the graphs under the external-data threshold into one file each → genai_config.json
               (export/genai.py) → manifest.json, written once → publish the folder
               (export/destination.py)

The folder is built in a staging folder beside EXPORT_DIR (gpt.files.staging), flushed to disk and
renamed at the end, so a failed export, a failed gate included, leaves nothing behind. The graphs
keep their weights in NAME.onnx.data until every gate has passed (onnxruntime maps them rather than
copying them), and the PyTorch model is gone before the first session opens: the peak is the
larger of the model and one session, not their sum. The runtime checks each graph from the manifest
held in memory, so manifest.json is written once, complete, at the end.
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

from export import onnxfile, verify
from export.destination import check_destination, publish
from export.fused import FUSED_OPS, build_fused
from export.genai import write_genai_config
from export.graph import EXPORTERS, TRACE_APART_ABOVE, check_graph, example_inputs, trace, trace_checkpoint
from export.onnxfile import EXTERNAL_DATA_ABOVE
from export.portable import MIN_OPSET, build_portable
from export.variants import NBITS, NBITS_ACCURACY, NBITS_BLOCKS, nbits_block, write_variant
from gpt.checkpoint import load_checkpoint, resolve_checkpoint, weights_sha256
from gpt.config import ModelConfig
from gpt.files import staging
from gpt.model import GPT
from gpt.tokenizer import tokenizer_sha256
from serve.manifest import DEFAULT_OPSET, EVAL_TOKENS, FORMAT, FORMAT_VERSION, VARIANT_FLAGS, VARIANTS, ExportError
from serve.runtime import OnnxModel


def export(source: str | Path, export_dir: str | Path, *, int8: bool = False, fp16: bool = False,
           int4: bool = False, int8_weights: bool = False, optimize: bool = False, opset: int = DEFAULT_OPSET,
           force: bool = False, eval_tokens: int = EVAL_TOKENS, checkpoint: str = "best", exporter: str = "builder",
           external_data_above: int = EXTERNAL_DATA_ABOVE, log: Callable[[str], None] = print) -> dict:
    """Export a run's best (or latest) checkpoint, or a checkpoint folder, to `export_dir`; returns the manifest.

    Each graph is NAME.onnx, with its weights in NAME.onnx.data when they pass `external_data_above`
    bytes (default: what protobuf allows). The PyTorch model is released before the first onnxruntime
    session opens, and each session is closed when its gates are passed."""
    export_dir = Path(export_dir)
    folder = resolve_checkpoint(source, checkpoint)
    check_destination(export_dir, folder, force)
    check_exporter(exporter, opset)
    model, tokenizer, meta = load_checkpoint(folder)
    meta = {**meta, "model_sha256": weights_sha256(folder, model)}  # a sharded checkpoint has no model.safetensors
    model.float().eval()
    config = model.config
    if (int4 or int8_weights) and not nbits_block(config.embedding_dim):
        raise ExportError(f"--int4 and --int8-weights quantize in blocks of {NBITS_BLOCKS[4][-1]} inputs, and this "
                          f"model's embedding_dim is {config.embedding_dim}: use --int8 (dynamic) instead")
    options = {"int8": int8, "fp16": fp16, "int4": int4, "int8_weights": int8_weights, "optimize": optimize,
               "opset": opset, "external_data_above": external_data_above}
    wanted = [v for v, flag in (("int8", int8), ("fp16", fp16), ("int4", int4), ("int8w", int8_weights)) if flag]
    variants = wanted + ([f"fused-{v}" for v in wanted] if optimize else [])
    started, timings = time.time(), {}
    with staging(export_dir) as tmp:
        references, graphs = from_model(model, tokenizer, folder, tmp, variants, optimize, opset, eval_tokens,
                                        timings, exporter)
        # a trace past TRACE_APART_ABOVE runs in its own process: the exporter would keep the model alive
        apart = exporter != "builder" and model.num_parameters(exclude_positions=False) * 4 > TRACE_APART_ABOVE
        if exporter != "builder" and not apart:
            with timed(timings, "trace"):
                exporter = trace(model, tmp / VARIANTS["fp32"], opset, exporter, external_data_above)
        del model  # the gates need only the references from here on
        release_memory()
        if apart:
            with timed(timings, "trace"):
                exporter = trace_checkpoint(folder, tmp / VARIANTS["fp32"], opset, exporter, external_data_above)
        graph = graphs.pop("fp32", None) or check_graph(tmp / VARIANTS["fp32"])
        log(f"exported {folder} with the {exporter} exporter: {graph['nodes']} nodes, opset {graph['opset']}")
        for variant in [v for v in variants if v != "fused-fp16"]:  # from the graphs on disk, not the model
            with timed(timings, variant):
                graphs[variant] = check_graph(write_variant(config, tmp, variant, opset))
        manifest = describe(config, tokenizer, meta, folder, checkpoint, graph, exporter, options)
        manifest["timings"] = timings
        for variant in ["fused", *variants]:
            if variant in graphs:
                add_graph(manifest, variant, graphs[variant])
        tokenizer.save(tmp / "tokenizer.json")
        verify_all(references, tmp, manifest, variants, optimize, log, folder)
        with timed(timings, "pack"):
            for variant, name in manifest["files"].items():
                manifest["graphs"][variant]["files"] = onnxfile.finish(tmp / name, external_data_above)
        log(f"graphs: {files_note(manifest)}")
        manifest["genai"] = write_genai_config(tmp, manifest, tokenizer)
        manifest["export_seconds"] = round(time.time() - started, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish(tmp, export_dir, folder, force, kind="onnx")
    return manifest


def check_exporter(exporter: str, opset: int) -> None:
    """An exporter that exists, and an opset it can write: checked before anything runs."""
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} is unknown: use one of {', '.join(EXPORTERS)}")
    if exporter == "builder" and opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the portable graph's LayerNormalization needs opset {MIN_OPSET} or "
                          "later: use a later --opset, or --exporter dynamo")


def from_model(model: GPT, tokenizer, folder: Path, tmp: Path, variants: list[str], optimize: bool, opset: int,
               eval_tokens: int, timings: dict, exporter: str) -> tuple[dict, dict]:
    """Everything that needs the PyTorch model but a trace: PyTorch's side of every gate, the portable
    graph (when the builder writes it), the fused graph and its fp16 twin. Returns (the references,
    {variant: check_graph's report})."""
    graphs = {}
    with timed(timings, "verify references"):
        references = verify.references(model, tokenizer, optimize, folder, eval_tokens if variants else 0)
    if exporter == "builder":
        with timed(timings, "portable"):
            build_portable(model, tmp / VARIANTS["fp32"], opset)
            graphs["fp32"] = check_graph(tmp / VARIANTS["fp32"])
    if optimize:
        with timed(timings, "fused"):
            build_fused(model, tmp / VARIANTS["fused"], opset=opset)
            graphs["fused"] = check_graph(tmp / VARIANTS["fused"])
    if "fused-fp16" in variants:  # written from the model's weights, as the fused graph is
        with timed(timings, "fused-fp16"):
            graphs["fused-fp16"] = check_graph(write_variant(model.config, tmp, "fused-fp16", opset, model))
    return references, graphs


def verify_all(references: dict, tmp: Path, manifest: dict, variants: list[str], optimize: bool,
               log: Callable[[str], None], folder: Path) -> None:
    """Every graph through its gates, one session at a time: a failed gate fails the export. The fp32
    graphs' greedy tokens are checked by PyTorch last, the model loaded again once every session is
    closed (verify.greedy_agreement)."""
    decoded = {"greedy": verify_portable(references, tmp, manifest, log)}
    if optimize:
        decoded["fused_greedy"] = verify_fused(references, tmp, manifest, log)
    if variants:
        manifest["quality"] = verify_variants(references, tmp, manifest, variants, log)
    with timed(manifest["timings"], "verify greedy"):
        model, _, _ = load_checkpoint(folder)
        model.float().eval()
        checked: dict[tuple, dict] = {}  # the two graphs mostly decode the same tokens: checked once
        for key, tokens in decoded.items():
            if tuple(tokens) not in checked:
                checked[tuple(tokens)] = verify.greedy_agreement(model, references["greedy"], tokens)
            manifest["parity"][key] = checked[tuple(tokens)]
        del model
        release_memory()
    for key, (graph, fix) in {"greedy": ("ONNX Runtime", portable_fix(manifest)),
                              "fused_greedy": ("the fused graph", "export without --optimize")}.items():
        if key in decoded:
            greedy = manifest["parity"][key]
            log(f"{graph}: {greedy['tokens']} greedy tokens identical to PyTorch's: {greedy['identical']}")
            verify.require_greedy(greedy, graph, fix)


def describe(config: ModelConfig, tokenizer, meta: dict, folder: Path, which: str, graph: dict, exporter: str,
             options: dict) -> dict:
    """The manifest: what the folder holds and where it came from (each step adds its results)."""
    import onnxruntime

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": asdict(config),
        "tokenizer": {"kind": tokenizer.kind, "file": "tokenizer.json", "sha256": tokenizer_sha256(tokenizer),
                      "eot_id": tokenizer.eot_id,
                      "chat": {"file": "tokenizer_config.json", "eos_token": tokenizer.chat.eos_token,
                               "eos_token_id": tokenizer.token_id(tokenizer.chat.eos_token)}
                      if tokenizer.chat is not None else None},
        "inputs": graph["inputs"], "outputs": graph["outputs"], "opset": graph["opset"], "dtype": "float32",
        "files": {}, "graphs": {},
        "export_options": {**options, "exporter": exporter, "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__},
        "source": {"checkpoint": str(folder), "step": meta.get("step"), "selected": which,
                   "val_loss": meta.get("val_loss") if meta.get("evaluated_at") == meta.get("step") else None,
                   "model_sha256": meta["model_sha256"]},
    }
    add_graph(manifest, "fp32", graph)
    return manifest


def add_graph(manifest: dict, variant: str, graph: dict) -> None:
    """A model file's lines in the manifest: its name in `files`, and in `graphs` its kind of cache and
    the ops it uses (its `files`, sizes and sha256 of the graph and its data file, once it is packed)."""
    fused, kind = variant.startswith("fused"), variant.removeprefix("fused-")
    manifest["files"][variant] = VARIANTS[variant]
    manifest["graphs"][variant] = {"cache": "shared" if fused else "concat",
                                   "cache_dtype": "float16" if fused and kind == "fp16" else "float32",
                                   "nodes": graph["nodes"], "ops": graph["ops"],
                                   "logits_to_keep": graph["logits_to_keep"], "files": {}}


@contextlib.contextmanager
def timed(timings: dict, step: str):
    """Record a step's wall seconds in the manifest's `timings`."""
    clock = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - clock, 1)


def release_memory() -> None:
    """Give freed memory back to the system before the next graph is opened: collect it, and (glibc)
    return the freed heap, which malloc would otherwise keep for this process."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the next session instead
        pass


@contextlib.contextmanager
def session(tmp: Path, manifest: dict, variant: str, what: str, fix: str, **kwargs):
    """One graph's onnxruntime session for its gates, closed (and its memory returned) after them.
    onnxruntime refusing the graph is a failed gate too, reported in one line."""
    try:
        runtime = OnnxModel(tmp, variant=variant, manifest=manifest, **kwargs)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime could not run {what} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); {fix}") from None
    try:
        yield runtime
    finally:
        del runtime
        release_memory()


def portable_fix(manifest: dict) -> str:
    """What to do when the portable graph fails a gate, by the exporter that wrote it."""
    return ("the builder writes the model as gpt/model.py ships it: if the model's code changed, export with "
            "--exporter dynamo, which traces it" if manifest["export_options"]["exporter"] == "builder"
            else "the export is not usable")


def verify_portable(references: dict, tmp: Path, manifest: dict, log: Callable[[str], None]) -> list[int]:
    """The parity grid, then 200 greedy tokens (returned, for PyTorch to check once the sessions are
    closed); a graph that fails the grid fails the export."""
    fix = portable_fix(manifest)
    with timed(manifest["timings"], "verify"), session(tmp, manifest, "fp32", "the portable graph", fix,
                                                       threads=0) as runtime:
        parity = verify.parity_grid(references["parity"], runtime)
        verify.require_parity(parity, "ONNX Runtime", fix)
        tokens = verify.greedy_run(references["greedy"], runtime)
    manifest["parity"] = {"fp32": parity}
    log(f"parity: {parity['cases']} cases, max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} "
        f"(tolerance {verify.FP32_TOLERANCE:.0e})")
    return tokens


def verify_fused(references: dict, tmp: Path, manifest: dict, log: Callable[[str], None]) -> list[int]:
    """The fused graph (export/fused.py) through the portable graph's gates: the parity grid (with
    ragged rows, as its batches run), then its 200 greedy tokens (returned, as verify_portable's)."""
    with timed(manifest["timings"], "verify fused"), session(tmp, manifest, "fused", "the fused graph",
                                                             "export without --optimize") as runtime:
        parity = verify.shared_parity_grid(references["shared"], runtime)
        verify.require_parity(parity, "the fused graph", "export without --optimize")
        tokens = verify.greedy_run(references["greedy"], runtime)
    manifest["parity"]["fused"] = parity
    graph = manifest["graphs"]["fused"]
    fused = ", ".join(f"{graph['ops'][op]} {op}" for op in FUSED_OPS if graph["ops"].get(op))
    log(f"fused graph: {graph['nodes']} nodes ({fused}); parity: {parity['cases']} cases, max |Δlogits|/scale "
        f"{parity['max_rel_logit_error']:.2e}")
    return tokens


def verify_variants(references: dict, tmp: Path, manifest: dict, variants: list[str],
                    log: Callable[[str], None]) -> dict:
    """Each quantized variant: finite logits, and its validation-loss change on the held-out tokens
    against the PyTorch model's (which the fp32 graphs match)."""
    windows, base, why = references["windows"], references["val_loss"], references["why"]
    quality = {"fp32_val_loss": base, "windows": 0 if windows is None else len(windows),
               "tokens": 0 if windows is None else int(windows[:, 1:].size)}
    config = references["parity"]["config"]
    probe = [a.numpy() for a in example_inputs(config, 2, 4, 0)[:3]]
    for variant in variants:
        kind, fix = variant.removeprefix("fused-"), f"export without {VARIANT_FLAGS[variant]}"
        with timed(manifest["timings"], f"verify {variant}"), \
                session(tmp, manifest, variant, f"the {variant} graph", fix) as quantized:
            if not np.isfinite(quantized.run(*probe, quantized.empty_cache(2))[0]).all():
                raise ExportError(f"the {variant} model produces NaN/inf logits; {fix}")
            entry = {"file": VARIANTS[variant]}
            if kind in ("int4", "int8w"):
                entry |= {"op": "MatMulNBits", "block_size": nbits_block(config.embedding_dim, NBITS[kind]),
                          "accuracy_level": NBITS_ACCURACY}
            quality[variant] = entry | variant_quality(quantized, windows, base, why, variant, log)
    return quality


def variant_quality(quantized: OnnxModel, windows: np.ndarray | None, base: float | None, why: str, variant: str,
                    log: Callable[[str], None]) -> dict:
    """A variant's validation loss and its change against fp32, with a warning past QUANTIZED_LOSS_WARNING."""
    if windows is None:
        log(f"{variant}: validation loss not measured: {why}")
        return {"val_loss": None, "note": why}
    loss = verify.validation_loss(quantized, windows)
    log(f"{variant}: validation loss {loss:.4f} vs fp32 {base:.4f} ({loss - base:+.4f} nats)")
    if loss - base > verify.QUANTIZED_LOSS_WARNING:
        log(f"warning: {variant} raises validation loss by {loss - base:.3f} nats "
            f"(> {verify.QUANTIZED_LOSS_WARNING}); prefer the fp32 model where quality matters")
    return {"val_loss": loss, "val_loss_change": loss - base}


def files_note(manifest: dict) -> str:
    """Each graph's size, and where its weights are: in it, or in its .data file."""
    parts = []
    for variant, entry in manifest["graphs"].items():
        size = entry["files"]["bytes"] + entry["files"].get("data", {}).get("bytes", 0)
        parts.append(f"{manifest['files'][variant]}{' + .data' if 'data' in entry['files'] else ''} "
                     f"{size / 2**20:.1f} MiB")
    return ", ".join(parts)
