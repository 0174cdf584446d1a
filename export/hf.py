"""`python -m export RUN DIR --format hf`: a checkpoint as a transformers GPT2LMHeadModel folder,
checked against transformers when it is installed. The conversion itself is gpt/hf.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from export.destination import HF_FORMAT, HF_REPORT, check_destination, publish
from gpt.checkpoint import load_checkpoint, resolve_checkpoint
from gpt.files import staging
from serve.manifest import ExportError


def export_hf(source: str | Path, export_dir: str | Path, *, force: bool = False, checkpoint: str = "best",
              log: Callable[[str], None] = print) -> dict:
    """Write a checkpoint as a transformers GPT2LMHeadModel (or LlamaForCausalLM) folder, checked against
    transformers when it is installed (logits within 1e-5 relative, 100 greedy tokens identical, no missing
    or unexpected keys)."""
    from gpt.hf import HFError, export_hf_folder, parity_with_transformers

    export_dir = Path(export_dir)
    which = checkpoint
    checkpoint = resolve_checkpoint(source, which)
    check_destination(export_dir, checkpoint, force, kind="hf")
    model, tokenizer, meta = load_checkpoint(checkpoint)
    with staging(export_dir) as tmp:
        try:
            export_hf_folder(model, tokenizer, tmp)
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
        publish(tmp, export_dir, checkpoint, force, kind="hf")
    return report

