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

import numpy as np

from export import onnxfile
from export.fused import build_fused
from serve.manifest import VARIANTS, ExportError


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantization (weights int8, activations quantized per call), after
    its recommended pre-processing (shape inference and graph optimisation). Both steps write through
    paths; a source with external data is quantized to a graph with external data (one file,
    NAME.onnx.data, as onnxruntime's quantizer names it)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.name.removesuffix(".onnx") + ".pre.onnx")
    external = onnxfile.data_file(src).is_file()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                              all_tensors_to_one_file=True, external_data_location=onnxfile.data_file(pre).name)
            # DefaultTensorType: onnx's shape inference cannot type the outputs of com.microsoft ops (fused graph)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        pre.unlink(missing_ok=True)
        onnxfile.data_file(pre).unlink(missing_ok=True)


# MatMulNBits settings, chosen by measurement on the CPU config: block 32 changed validation loss least
# (4 bits: +0.0061 nats at 32, +0.0056 at 64, +0.0079 at 128; 8 bits: +0.0001 at all three), and
# accuracy level 4 (int8 activations in the kernel) decoded fastest at seed size.
NBITS_BLOCK, NBITS_ACCURACY = 32, 4


def quantize_nbits(src: Path, dst: Path, bits: int) -> None:
    """Weight-only quantization of every MatMul with a constant 2-D weight to `bits` bits: MatMulNBits,
    symmetric, blocks of NBITS_BLOCK along K, onnxruntime's own C++ quantizer for the values. A bias
    added right after (a constant Add with no other reader) becomes MatMulNBits' bias input.

    Written here rather than through onnxruntime's MatMulNBitsQuantizer, which loads the whole fp32
    model and builds the new one beside it: this reads one weight at a time from the source and
    streams the result to DST.data (packed into DST when small), so a GPT-2-large graph is never in
    memory. The values and the graph are what that quantizer writes."""
    from onnx import helper

    model = onnxfile.load(src, weights=False)
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    biases = _foldable_biases(graph, consts)
    weights = onnxfile.WeightFile(dst, external=True)
    nodes, inits, written, folded = [], [], set(), set()

    def keep(name: str) -> None:
        if name in consts and name not in written:
            written.add(name)
            inits.append(weights.tensor(name, onnxfile.read_tensor(consts[name], src.parent)))

    for node in graph.node:
        b = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        if b is None or len(b.dims) != 2 or b.dims[0] % NBITS_BLOCK:
            for name in node.input:
                keep(name)
            nodes.append(node)
            continue
        packed, scales = _quantize_block(onnxfile.read_tensor(b, src.parent), bits)
        quantized, scale_name = f"{b.name}_Q{bits}", f"{b.name}_scales"
        inits += [weights.tensor(quantized, packed), weights.tensor(scale_name, scales)]
        inputs = [node.input[0], quantized, scale_name]
        keep(node.input[0])
        output, bias = node.output[0], biases.get(node.output[0])
        if bias is not None:  # MatMulNBits(A, B, scales, zero_points, g_idx, bias)
            add, bias_name = bias
            keep(bias_name)
            inputs += ["", "", bias_name]
            output = add.output[0]
            folded.add(id(add))
        nodes.append(helper.make_node("MatMulNBits", inputs, [output], name=f"{node.name}_Q{bits}",
                                      domain="com.microsoft", K=b.dims[0], N=b.dims[1], bits=bits,
                                      block_size=NBITS_BLOCK, accuracy_level=NBITS_ACCURACY))
    nodes = [n for n in nodes if id(n) not in folded]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    weights.close()
    onnxfile.resave(model, dst)


def _foldable_biases(graph, consts: dict) -> dict:
    """MatMul output -> (the Add node, its constant bias) where the Add is the output's only reader."""
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    out = {}
    for n in graph.node:
        if n.op_type != "MatMul":
            continue
        users = readers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and users[0].input[0] == n.output[0] and \
                users[0].input[1] in consts and len(consts[users[0].input[1]].dims) == 1:
            out[n.output[0]] = (users[0], users[0].input[1])
    return out


def _quantize_block(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32 -> MatMulNBits' packed blocks (N, K/block, block*bits/8) and scales (N, K/block)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = weight.shape
    blocks = k // NBITS_BLOCK
    packed = np.zeros((n, blocks, NBITS_BLOCK * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)  # unused: symmetric
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, weight, scales, zero_points, NBITS_BLOCK, n, k, True)
    return packed, scales


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 graph inputs and outputs (so callers need no change)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnxfile.load(src), keep_io_types=True)
    _topological_sort(model.graph)  # the converter appends its input casts after their users
    onnxfile.save(model, dst, external_data_above=0)  # the weights beside it; finish() packs them if small


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
    derives from, already there; returns its path. Its weights may be in NAME.onnx.data: the caller
    checks the graph, then export.onnxfile.finish packs them in when they are under the threshold."""
    fused = variant.startswith("fused-")
    kind = variant.removeprefix("fused-")
    source, target = folder / VARIANTS["fused" if fused else "fp32"], folder / VARIANTS[variant]
    if fused and kind == "fp16":  # written directly: GroupQueryAttention's cache must be fp16 too
        build_fused(model, target, opset=opset, dtype="float16")
    else:
        MAKERS[kind](source, target)
    return target
