"""The export folder's contract: what `python -m export` writes and the runtime reads.

    EXPORT_DIR/
        model.onnx           fp32 graph, weights inside
        model.int8.onnx      (--int8) dynamic int8 quantization
        model.fp16.onnx      (--fp16) fp16 weights and compute, fp32 inputs and outputs
        manifest.json        format and version, model config, vocabulary, input/output names and
                             shapes, opset, export options, source checkpoint sha256, parity results

Imports no torch: serving reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "gpt-onnx"
FORMAT_VERSION = 1
VARIANTS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class ExportError(RuntimeError):
    """An export folder that cannot be used, or an export that failed. The message says what to do."""


def input_names(num_layers: int) -> list[str]:
    """Graph inputs, named as Optimum and onnxruntime-genai name theirs."""
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def read_manifest(export_dir: str | Path) -> dict:
    """Read and check manifest.json; one-line errors that say what to do."""
    export_dir = Path(export_dir)
    path = export_dir / "manifest.json"
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir} is not a folder: pass the EXPORT_DIR written by `python -m export`")
    if not path.is_file():
        raise ExportError(f"{path} is missing: {export_dir} is not an export folder; run `python -m export RUN_DIR "
                          f"{export_dir}` to make one")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e.msg}): export again with `python -m export`") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: export again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = "upgrade gpt to read it" if newer else "re-export it with this version: python -m export RUN_DIR DIR"
        raise ExportError(f"{path} is format version {version}; this build reads version {FORMAT_VERSION}: {fix}")
    for key in ("model", "vocab", "inputs", "outputs", "files"):
        if key not in manifest:
            raise ExportError(f"{path} lacks {key!r}: the export is incomplete; export again")
    return manifest


def model_path(export_dir: str | Path, manifest: dict, variant: str = "fp32") -> Path:
    if variant not in VARIANTS:
        raise ExportError(f"unknown model variant {variant!r}: use one of {', '.join(VARIANTS)}")
    name = manifest["files"].get(variant)
    if name is None:
        flag = {"int8": " --int8", "fp16": " --fp16"}.get(variant, "")
        raise ExportError(f"{export_dir} has no {variant} model: export with `python -m export RUN_DIR DIR{flag}`")
    path = Path(export_dir) / name
    if not path.is_file():
        raise ExportError(f"{path} is missing from the export folder: export again with `python -m export`")
    return path
