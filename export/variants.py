"""The other precisions of a graph: each written from the fp32 (or fused) file beside it.

    quantize_int8()    onnxruntime's dynamic int8 quantization (--int8)
    quantize_nbits()   weight-only 4 or 8 bits through MatMulNBits (--int4, --int8-weights)
    convert_fp16()     fp16 weights and compute, fp32 inputs and outputs (--fp16)
    write_variant()    the one for a variant name, fused twins included
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path

from export.fused import build_fused, fold_matmul_bias
from serve.manifest import VARIANTS, ExportError


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



MAKERS = {"int8": quantize_int8, "fp16": convert_fp16, "int4": functools.partial(quantize_nbits, bits=4),
          "int8w": functools.partial(quantize_nbits, bits=8)}


def write_variant(model, folder: Path, variant: str, opset: int) -> Path:
    """Write `variant` (int8, fp16, int4, int8w, or fused-... of each) into `folder` from the graph it
    derives from, already there; returns its path."""
    fused = variant.startswith("fused-")
    kind = variant.removeprefix("fused-")
    source, target = folder / VARIANTS["fused" if fused else "fp32"], folder / VARIANTS[variant]
    if fused and kind == "fp16":  # written directly: GroupQueryAttention's cache must be fp16 too
        build_fused(model, target, opset=opset, dtype="float16")
    else:
        MAKERS[kind](source, target)
        if fused and kind in ("int4", "int8w"):
            fold_matmul_bias(target)
    return target
