"""How much each variant of an export loses on your text: `python -m serve.evaluate EXPORT --text FILES`.

    python -m serve.evaluate exports/shakespeare_char_cpu --text my_text.txt --model all

For each model file of the export (fp32 first, the reference), every document of the text is scored
with serve.scoring.Scorer (rolling windows over block_size, `--stride` tokens apart) and the table
gives: tokens scored, nats per token, perplexity, bits per byte, the change in nats per token and in
bits per byte against fp32, and tokens/s. Bits per byte compare tokenizers: a char model and a BPE
model of the same text are on one scale. The same figures are written as JSON.

What is scored: every token after the first of each document; a tokenizer with an end-of-text token
(byte-level BPE) puts it before the document, as lm-evaluation-harness does, so the document's first
token is scored too. Bytes are those of the scored text. The server's `echo` + `logprobs` give the
same log-probabilities for the same tokens.

Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from serve.manifest import VARIANTS


def read_documents(spec: str) -> list[tuple[str, str]]:
    """(name, text) of every document `spec` names: a file, a folder (.txt, .md, .jsonl) or a glob, read
    as the training corpus is (gpt.corpus: a .jsonl line with a "text" field is one document)."""
    from gpt.corpus import documents, find_files

    files, root = find_files(spec)
    return [(doc.name, "".join(doc.text_chunks)) for doc in documents(files, root, skip_bad=False)]


def scored_text(tokenizer, text: str) -> tuple[list[int], int]:
    """The ids to score (the end-of-text token first when the tokenizer has one) and the UTF-8 bytes of
    the text whose tokens are scored."""
    ids = tokenizer.encode(text)
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id, *ids], len(text.encode("utf-8"))
    return ids, len(tokenizer.decode(ids[1:]).encode("utf-8"))


def evaluate_variant(model, texts: list[tuple[list[int], int]], stride: int | None, batch: int | None) -> dict:
    """One model's figures over the tokenized documents."""
    from serve.scoring import Scorer

    scorer = Scorer(model, batch=batch)
    nats, tokens, nbytes = 0.0, 0, 0
    started = time.perf_counter()
    for ids, size in texts:
        scores = scorer.score(ids, stride)
        nats -= scores.total
        tokens += len(scores.logprobs)
        nbytes += size
    seconds = time.perf_counter() - started
    per_token = nats / max(tokens, 1)
    return {"tokens": tokens, "bytes": nbytes, "nats": nats, "nats_per_token": per_token,
            "perplexity": math.exp(per_token), "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}


def evaluate(export_dir: str | Path, spec: str, variants: str = "all", stride: int | None = None, threads: int = 0,
             batch: int | None = None, log=print) -> dict:
    """Score the text under each variant; returns the report (what --json writes)."""
    from serve.manifest import read_manifest
    from serve.runtime import OnnxModel

    started = time.perf_counter()
    available = list(read_manifest(export_dir)["files"])
    chosen = available if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in available]
    if unknown:
        raise ValueError(f"--model {','.join(unknown)}: the export holds {', '.join(available)} (or use all)")
    chosen = ["fp32", *[v for v in chosen if v != "fp32"]]  # the reference first, always
    docs = read_documents(spec)
    report = {"export": str(export_dir), "text": spec, "documents": len(docs), "stride": stride, "variants": {}}
    texts = None
    for variant in chosen:
        model = OnnxModel(export_dir, variant=variant, threads=threads)
        if stride is not None and not 1 <= stride <= model.block_size:
            raise ValueError(f"--stride {stride} must be from 1 to the model's block_size, {model.block_size}")
        texts = texts or [scored_text(model.tokenizer, text) for _, text in docs]
        result = evaluate_variant(model, texts, stride, batch)
        base = report["variants"].get("fp32", result)
        result["change_nats_per_token"] = result["nats_per_token"] - base["nats_per_token"]
        result["change_bits_per_byte"] = result["bits_per_byte"] - base["bits_per_byte"]
        report["variants"][variant] = result
        log(f"{variant}: {result['tokens']:,} tokens in {result['seconds']:.1f} s")
    report["seconds"] = time.perf_counter() - started
    return report


def table(report: dict) -> str:
    rows = [("model", "tokens", "nats/token", "perplexity", "bits/byte", "Δ nats/token", "Δ bits/byte", "tokens/s")]
    for variant, r in report["variants"].items():
        rows.append((variant, f"{r['tokens']:,}", f"{r['nats_per_token']:.4f}", f"{r['perplexity']:.3f}",
                     f"{r['bits_per_byte']:.4f}", f"{r['change_nats_per_token']:+.4f}",
                     f"{r['change_bits_per_byte']:+.4f}", f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.evaluate",
        description="Score a text under every model of an export folder (fp32 first, the reference): tokens, nats "
        "per token, perplexity, bits per byte, the change against fp32, tokens/s. Long texts are scored in rolling "
        "windows over block_size. No torch needed.",
        epilog="Example: python -m serve.evaluate exports/shakespeare_char_cpu --text notes.txt --model fp32,int8",
    )
    parser.add_argument("export_dir")
    parser.add_argument("--text", required=True, help="a text file, a folder of .txt/.md/.jsonl files, or a glob")
    parser.add_argument("--model", default="all", help=f"all (default), or a comma-separated list of: "
                        f"{', '.join(VARIANTS)}")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default block_size: disjoint windows, as lm-eval)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--batch", type=int, default=None,
                        help="windows scored together (default: as many as 256 MiB of logits hold, at most 32)")
    parser.add_argument("--json", default="evaluation.json", help="where to write the figures (default "
                        "evaluation.json)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from gpt.cli import run_command
    from gpt.corpus import CorpusError
    from serve.manifest import DeviceError, ExportError

    def work() -> None:
        report = evaluate(args.export_dir, args.text, args.model, args.stride, args.threads, args.batch,
                          log=lambda line: print(line, file=sys.stderr))
        print(table(report))
        Path(args.json).write_text(json.dumps(report, indent=2, default=_plain))
        print(f"{report['documents']} document(s), {report['seconds']:.1f} s in all; wrote {args.json}",
              file=sys.stderr)

    return run_command(work, (ExportError, DeviceError, CorpusError, ValueError))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(run())
