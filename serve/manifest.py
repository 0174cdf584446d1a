"""The export folder's contract: what `python -m export` writes and the runtime reads.

    EXPORT_DIR/
        model.onnx           fp32 graph, weights inside (or, past protobuf's 2 GB, in model.onnx.data beside it:
                             each graph below is NAME.onnx plus at most one NAME.onnx.data, named with its size
                             and sha256 in the manifest's graphs.VARIANT.files)
        model.int8.onnx      (--int8) dynamic int8 quantization
        model.fp16.onnx      (--fp16) fp16 weights and compute, fp32 inputs and outputs
        model.int4.onnx      (--int4) 4-bit weights through MatMulNBits (block 32, accuracy level 4)
        model.int8w.onnx     (--int8-weights) 8-bit weights through MatMulNBits, fp32 activations
        model.fused.onnx     (--optimize) the fused graph: onnxruntime's com.microsoft ops (GroupQueryAttention,
                             SkipLayerNormalization, FastGelu) and a cache written in place (export/fused.py);
                             with --optimize, each of the variants above also gets a fused twin,
                             model.fused.int8.onnx, model.fused.int4.onnx, model.fused.int8w.onnx and
                             model.fused.fp16.onnx (fp16 cache, for CUDA)
        genai_config.json    (bpe models) onnxruntime-genai's config for the fused graph if there is one, else the
                             portable one; tokenizer_config.json beside it
        tokenizer.json       the tokenizer (a char vocabulary, or Hugging Face tokenizers' format for bpe)
        manifest.json        format and version, model config, the tokenizer's kind and sha256, input/output names and
                             shapes, opset, export options, source checkpoint sha256, parity results, and for each
                             model file its graph: ops used and the kind of cache ("concat" or "shared")

Imports no torch: serving reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "gpt-onnx"
FORMAT_VERSION = 2  # 2: the tokenizer in tokenizer.json (1 carried a char vocabulary inline, and is still read)
READABLE_VERSIONS = (1, 2)
VARIANTS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
            "int4": "model.int4.onnx", "int8w": "model.int8w.onnx",
            "fused": "model.fused.onnx", "fused-int8": "model.fused.int8.onnx", "fused-fp16": "model.fused.fp16.onnx",
            "fused-int4": "model.fused.int4.onnx", "fused-int8w": "model.fused.int8w.onnx"}
# the export flags that write each variant
VARIANT_FLAGS = {"int8": "--int8", "fp16": "--fp16", "int4": "--int4", "int8w": "--int8-weights",
                 "fused": "--optimize", "fused-int8": "--optimize --int8", "fused-fp16": "--optimize --fp16",
                 "fused-int4": "--optimize --int4", "fused-int8w": "--optimize --int8-weights"}
CACHE_KINDS = ("concat", "shared")
CACHE_DTYPES = ("float32", "float16")
DEFAULT_OPSET = 18
EVAL_TOKENS = 4096  # held-out tokens behind each variant's validation-loss change (manifest: quality.tokens)


class ExportError(RuntimeError):
    """An export folder that cannot be used, or an export that failed. The message says what to do."""


class DeviceError(RuntimeError):
    """The device asked for cannot run the model here (no onnxruntime-gpu, no CUDA libraries)."""


# An input with a default (an initializer of the same name), as transformers' argument of that name:
# the graph computes logits for the last N positions, every position when 0, its default. A prefill
# asks for the last alone; whatever does not bind it (onnxruntime-genai, scoring) gets every position.
# Not among input_names: onnxruntime lists it apart (InferenceSession.get_overridable_initializers).
LOGITS_TO_KEEP = "logits_to_keep"


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
        left = sorted(export_dir.parent.glob(f".{export_dir.name}.old-*")) if export_dir.parent.is_dir() else []
        if left:
            raise ExportError(f"{export_dir} is missing, and an export interrupted while replacing it left the "
                              f"previous one at {left[-1]}: rename it back to {export_dir}, or export again")
        raise ExportError(f"{export_dir} is not a folder: pass the EXPORT_DIR written by `python -m export`")
    if not path.is_file():
        raise ExportError(f"{path} is missing: {export_dir} is not an export folder; run `python -m export RUN_DIR "
                          f"{export_dir}` to make one")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e.msg}): export again with `python -m export`") from None
    return check_manifest(export_dir, manifest)


def check_manifest(export_dir: str | Path, manifest: dict) -> dict:
    """Check a manifest read from `export_dir`, or one held in memory while the export is being written
    (the exporter checks each graph before manifest.json exists); returns it."""
    path = Path(export_dir) / "manifest.json"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{path} has format {found!r}, expected {FORMAT!r}: export again")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = "upgrade gpt to read it" if newer else "re-export it with this version: python -m export RUN_DIR DIR"
        raise ExportError(f"{path} is format version {version}; this build reads version {FORMAT_VERSION}: {fix}")
    for key in ("model", "vocab" if version == 1 else "tokenizer", "inputs", "outputs", "files"):
        if key not in manifest:
            raise ExportError(f"{path} lacks {key!r}: the export is incomplete; export again")
    _check_contents(path, manifest)
    return manifest


def _check_contents(path: Path, manifest: dict) -> None:
    """A manifest is data from disk: check what the runtime will act on before it acts on it."""
    from gpt.config import ConfigError, model_config_from_dict

    bad = f"{path} is damaged or was edited"
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ExportError(f"{bad}: 'files' must map variants to file names; export again")
    for variant, name in files.items():
        # plain names inside the folder only: no separators, no '..', no absolute paths
        if name != Path(name).name or name in ("", ".", "..") or "\\" in name or name.startswith("."):
            raise ExportError(f"{bad}: the {variant} model file {name!r} is not a plain file name inside the "
                              "export folder; export again")
    graphs = manifest.get("graphs", {})
    if not isinstance(graphs, dict) or not all(
            isinstance(g, dict) and g.get("cache", "concat") in CACHE_KINDS and
            g.get("cache_dtype", "float32") in CACHE_DTYPES for g in graphs.values()):
        raise ExportError(f"{bad}: 'graphs' must describe each model file's cache as one of "
                          f"{', '.join(CACHE_KINDS)}; export again")
    if any(v.startswith("fused") and graphs.get(v, {}).get("cache") != "shared" for v in files):
        raise ExportError(f"{bad}: a fused model file has no 'graphs' entry saying its cache is shared; export again")
    try:
        config = model_config_from_dict(manifest["model"] if isinstance(manifest["model"], dict) else {})
        tokenizer = manifest_tokenizer(path.parent, manifest)
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{bad}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; export again") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise ExportError(f"{bad}: its vocabulary has {tokenizer.vocab_size} tokens but the model has "
                          f"{config.vocab_size}; export again")
    layers = config.num_layers
    if [i.get("name") for i in manifest["inputs"] if isinstance(i, dict)] != input_names(layers) or \
            [o.get("name") for o in manifest["outputs"] if isinstance(o, dict)] != output_names(layers):
        raise ExportError(f"{bad}: its inputs and outputs are not those of a {layers}-layer model; export again")


def manifest_tokenizer(export_dir: str | Path, manifest: dict):
    """The export's tokenizer: tokenizer.json, checked against the sha256 the manifest recorded."""
    import hashlib

    from gpt.chat import read_chat_template
    from gpt.tokenizer import CharTokenizer, tokenizer_from_json

    if manifest.get("format_version") == 1:
        return CharTokenizer.from_dict(manifest["vocab"] if isinstance(manifest["vocab"], dict) else {})
    entry = manifest["tokenizer"]
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or name != Path(name).name or name in ("", ".", "..") or name.startswith("."):
        raise ValueError(f"the tokenizer file {name!r} is not a plain file name inside the export folder")
    path = Path(export_dir) / name
    if not path.is_file() or path.resolve().parent != Path(export_dir).resolve():
        raise ValueError(f"{path} is missing or points outside the export folder")
    text = path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{path} does not match the sha256 the manifest recorded")
    tokenizer = tokenizer_from_json(text)
    tokenizer.chat = read_chat_template(export_dir)  # tokenizer_config.json: a user may add or edit a template
    return tokenizer


def model_path(export_dir: str | Path, manifest: dict, variant: str = "fp32") -> Path:
    if variant not in VARIANTS:
        raise ExportError(f"unknown model variant {variant!r}: use one of {', '.join(VARIANTS)}")
    name = manifest["files"].get(variant)
    if name is None:
        flag = f" {VARIANT_FLAGS[variant]}" if variant in VARIANT_FLAGS else ""
        raise ExportError(f"{export_dir} has no {variant} model: export with `python -m export RUN_DIR DIR{flag}`")
    path = Path(export_dir) / name
    if path.resolve().parent != Path(export_dir).resolve():  # a link pointing elsewhere
        raise ExportError(f"{path} points outside the export folder: export again with `python -m export`")
    if not path.is_file():
        raise ExportError(f"{path} is missing from the export folder: export again with `python -m export`")
    check_data_file(Path(export_dir), manifest, variant, path)
    return path


def check_data_file(export_dir: Path, manifest: dict, variant: str, path: Path) -> None:
    """A graph past protobuf's 2 GB keeps its weights in NAME.onnx.data: the manifest names it and its
    size, and both are checked before onnxruntime opens the graph (a truncated copy fails here, in one line)."""
    files = manifest.get("graphs", {}).get(variant, {}).get("files") or {}
    data = files.get("data") if isinstance(files, dict) else None
    if data is None:
        return
    name = data.get("file") if isinstance(data, dict) else None
    if not isinstance(name, str) or name != f"{path.name}.data":
        raise ExportError(f"{export_dir / 'manifest.json'} is damaged or was edited: the {variant} graph's data "
                          f"file must be {path.name}.data; export again")
    target = export_dir / name
    if not target.is_file() or target.resolve().parent != export_dir.resolve():
        raise ExportError(f"{target} is missing: {path.name} keeps its weights there; copy the whole export folder, "
                          "or export again")
    if target.stat().st_size != data.get("bytes"):
        raise ExportError(f"{target} has {target.stat().st_size} bytes, the manifest recorded {data.get('bytes')}: "
                          "the copy is incomplete; copy the export folder again, or export again")
