"""What 4-bit costs in quality, ours and llama.cpp's, side by side on the same held-out text.

    python -m launch configs/shakespeare_char_cpu.yaml        # a trained run (or any run folder)
    python bench/quantized_quality.py runs/shakespeare_char_cpu

The run's best checkpoint is exported twice, as ONNX (`--optimize --int4`) and as GGUF (f32, q8_0,
q4_0), and each file's validation loss (nats per token) is measured on the same windows of the run's
held-out split (export.verify.validation_windows): ours through onnxruntime, llama.cpp's from its
logits (llama-cpp-python). Each change is against the same engine's fp32 file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import machine  # noqa: E402
from bench.engines import EngineCrash, in_child  # noqa: E402


def llama_loss(path: Path, windows: np.ndarray, threads: int) -> float:
    """Mean next-token loss of a GGUF file over the windows, from llama.cpp's logits."""
    import llama_cpp

    from export.verify import _nll

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          n_threads=threads, logits_all=True, verbose=False)
    total = 0.0
    for window in windows:
        llm.reset()
        llm.eval(window[:-1].tolist())
        total += _nll(np.array(llm.scores[:len(window) - 1], dtype=np.float32), window[1:])
    return total / windows[:, 1:].size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (its best checkpoint) or a checkpoint folder")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from export.gguf import export_gguf
    from export.pipeline import export
    from export.verify import validation_loss, validation_windows
    from gpt.checkpoint import resolve_checkpoint
    from serve.runtime import OnnxModel

    print(machine())
    checkpoint = resolve_checkpoint(args.run, "best")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = export(checkpoint, tmp / "onnx", optimize=True, int4=True, log=lambda s: None)
        export_gguf(checkpoint, tmp / "gguf", types=["f32", "q8_0", "q4_0"], log=lambda s: None)
        windows, why = validation_windows(checkpoint, manifest["model"]["block_size"], args.tokens)
        if windows is None:
            raise SystemExit(f"no held-out text: {why}")
        ours = {v: validation_loss(OnnxModel(tmp / "onnx", threads=args.threads, variant=v), windows)
                for v in ("fused", "fused-int4")}
        theirs = {}
        for t in ("f32", "q8_0", "q4_0"):  # each type in a child first: a crash is a line, not the run
            path = tmp / "gguf" / f"model.{t}.gguf"
            try:
                in_child("llama.cpp", f"running {path.name}", "bench.engines:llama_probe",
                         {"path": str(path), "n_ctx": windows.shape[1], "threads": args.threads,
                          "prompt": windows.shape[1] - 1, "steps": 0})
            except EngineCrash as crash:
                raise SystemExit(f"no llama.cpp figures: {crash}") from None
            theirs[t] = llama_loss(path, windows, args.threads)
    print(f"{checkpoint}: {len(windows)} windows of {windows.shape[1] - 1} held-out tokens")
    block = manifest["quality"]["fused-int4"]["block_size"]
    print(f"ours (onnxruntime):  fp32 {ours['fused']:.4f}   int4 (MatMulNBits, block {block}) "
          f"{ours['fused-int4']:.4f}   change {ours['fused-int4'] - ours['fused']:+.4f} nats")
    print(f"llama.cpp:           f32  {theirs['f32']:.4f}   q4_0 {theirs['q4_0']:.4f}   change "
          f"{theirs['q4_0'] - theirs['f32']:+.4f} nats   (q8_0 {theirs['q8_0'] - theirs['f32']:+.4f})")
    print(f"fp32 engines agree: ours {ours['fused']:.4f} vs llama.cpp {theirs['f32']:.4f} "
          f"(difference {theirs['f32'] - ours['fused']:+.5f})")


if __name__ == "__main__":
    main()
