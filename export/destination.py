"""Where an export may be written: never over a checkpoint or a folder of someone else's files, and
`--force` replaces only an earlier export of the same kind, as a whole (gpt.files.publish_folder)."""

from __future__ import annotations

import json
from pathlib import Path

from gpt.files import publish_folder
from serve.manifest import FORMAT, ExportError

HF_REPORT = "export_report.json"


HF_FORMAT = "gpt-hf"


HF_EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", HF_REPORT}

GGUF_REPORT, GGUF_FORMAT = HF_REPORT, "gpt-gguf"  # the GGUF folder: model.TYPE.gguf, Modelfile, its report


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
    marker, expected = {"onnx": ("manifest.json", FORMAT), "hf": (HF_REPORT, HF_FORMAT),
                        "gguf": (GGUF_REPORT, GGUF_FORMAT)}[kind]
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
    elif kind == "gguf":
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        ours = {GGUF_REPORT, "Modelfile"} | {str(f.get("file")) for f in files.values() if isinstance(f, dict)}
    else:
        ours = HF_EXPORT_FILES
    foreign = [name for name in entries if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"{export_dir} holds {shown}, which the export did not write; --force would delete it: "
                          "move it away, or choose another EXPORT_DIR")


def publish(tmp: Path, export_dir: Path, folder: Path, force: bool, kind: str) -> None:
    check_destination(export_dir, folder, force, kind)  # again: the folder may have changed meanwhile
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    publish_folder(tmp, export_dir, replace=True)

