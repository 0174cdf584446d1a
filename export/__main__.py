"""Command line: parse, call export.pipeline.export (or export.hf.export_hf), errors as one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from export.onnxfile import EXTERNAL_DATA_ABOVE
from serve.manifest import DEFAULT_OPSET, EVAL_TOKENS


def size(text: str) -> int:
    """A byte count: 123, 500K, 500M, 2G."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        value = float(text[:-1]) * units[text[-1].upper()] if text and text[-1].upper() in units else int(text)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with K, M or G") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give a size of 0 or more")
    return int(value)


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training run (its best or latest checkpoint) or a checkpoint folder to a verified ONNX "
        "model with a KV cache: model.onnx + manifest.json, checked against PyTorch before it is written.",
        epilog="Example: python -m export runs/shakespeare_char_cpu exports/shakespeare_char_cpu --int8",
    )
    parser.add_argument("source", help="a run's out_dir, or one of its checkpoints/step-NNNNNN folders")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="from a run's out_dir: the checkpoint with the lowest validation loss (default; the "
                        "latest if none was evaluated) or the latest")
    parser.add_argument("export_dir", help="folder to write (must be new or empty, unless --force)")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8 quantization)")
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (fp16 weights, fp32 I/O)")
    parser.add_argument("--int4", action="store_true",
                        help="also write model.int4.onnx (4-bit weights through MatMulNBits, fp32 activations)")
    parser.add_argument("--int8-weights", action="store_true",
                        help="also write model.int8w.onnx (8-bit weights through MatMulNBits, fp32 activations)")
    parser.add_argument("--optimize", action="store_true",
                        help="also write model.fused.onnx: onnxruntime's fused ops (GroupQueryAttention, "
                        "SkipLayerNormalization, FastGelu) with a cache written in place, checked like model.onnx; "
                        "each quantized variant then gets a fused twin (model.fused.int4.onnx, ...)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--exporter", choices=["builder", "dynamo", "torchscript"], default="builder",
                        help="how model.onnx is made (recorded in the manifest): builder (default) writes it from "
                        "the weights (export/portable.py); dynamo traces gpt/model.py with torch.export (use it "
                        "after changing the model's code); torchscript, the older tracer, only if dynamo fails")
    parser.add_argument("--external-data-above", type=size, default=EXTERNAL_DATA_ABOVE, metavar="BYTES",
                        help="write a graph's weights to NAME.onnx.data (one file beside NAME.onnx) when they pass "
                        "this size, e.g. 500M (default: what protobuf allows, about 2 GB)")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, metavar="N",
                        help=f"held-out tokens for each variant's validation-loss change (default {EVAL_TOKENS})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty EXPORT_DIR")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    parser.add_argument("--format", choices=["onnx", "hf", "gguf"], default="onnx",
                        help="onnx (default): the verified ONNX folder; hf: a transformers GPT2LMHeadModel folder "
                        "that from_pretrained loads; gguf: model.TYPE.gguf for llama.cpp and ollama (+ a Modelfile)")
    parser.add_argument("--gguf-type", default="f16", metavar="TYPE[,TYPE...]",
                        help="--format gguf: f32, f16 (default), q8_0, q5_0, q5_1, q4_0, q4_1; several separated by "
                        "commas")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    from export.hf import export_hf
    from export.pipeline import export
    from gpt.checkpoint import CheckpointError
    from gpt.cli import run_command
    from gpt.config import ConfigError
    from serve.manifest import ExportError

    if args.threads:
        torch.set_num_threads(args.threads)

    def work() -> None:
        if args.format == "gguf":
            from export.gguf import export_gguf

            export_gguf(args.source, args.export_dir, types=[t.strip() for t in args.gguf_type.split(",") if t.strip()],
                        force=args.force, checkpoint=args.checkpoint)
            print(f"wrote {args.export_dir}: run it with llama.cpp (llama-cli -m {args.export_dir}/model.TYPE.gguf) "
                  "or ollama (ollama create NAME -f Modelfile)")
            return
        if args.format == "hf":
            if args.int8 or args.fp16 or args.int4 or args.int8_weights or args.optimize:
                raise ExportError("--int8, --fp16, --int4, --int8-weights and --optimize are ONNX variants: leave "
                                  "them out with --format hf")
            export_hf(args.source, args.export_dir, force=args.force, checkpoint=args.checkpoint)
            print(f"wrote {args.export_dir} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, "
                  "export_report.json): load it with transformers' from_pretrained")
            return
        manifest = export(args.source, args.export_dir, int8=args.int8, fp16=args.fp16, int4=args.int4,
                          int8_weights=args.int8_weights, optimize=args.optimize, opset=args.opset, force=args.force,
                          checkpoint=args.checkpoint, exporter=args.exporter, eval_tokens=args.eval_tokens,
                          external_data_above=args.external_data_above)
        config = ["tokenizer_config.json (the chat template)"] if manifest["tokenizer"].get("chat") else []
        files = ", ".join([*manifest["files"].values(), "tokenizer.json", *config])
        print(f"wrote {args.export_dir} ({files}, manifest.json) in {manifest['export_seconds']}s")

    return run_command(work, (ExportError, CheckpointError, ConfigError, ValueError))


if __name__ == "__main__":
    from gpt.cli import leave

    leave(run())
