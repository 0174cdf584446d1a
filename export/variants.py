"""The other precisions of a graph: each written from the fp32 (or fused) file beside it.

    quantize_int8()    onnxruntime's dynamic int8 quantization (--int8)
    quantize_nbits()   weight-only 4 or 8 bits through MatMulNBits (--int4, --int8-weights)
    convert_fp16()     fp16 weights and compute, fp32 inputs and outputs (--fp16)
    write_variant()    the one for a variant name, fused twins included
"""

from __future__ import annotations

import contextlib
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
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.name.removesuffix(".onnx") + ".pre.onnx")
    external = onnxfile.data_file(src).is_file()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)
            onnxruntime.set_default_logger_severity(3)  # its session warns that logits_to_keep is no constant
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                              all_tensors_to_one_file=True, external_data_location=onnxfile.data_file(pre).name)
            # DefaultTensorType: onnx's shape inference cannot type the outputs of com.microsoft ops (fused graph)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's default: warnings
        pre.unlink(missing_ok=True)
        onnxfile.data_file(pre).unlink(missing_ok=True)


# MatMulNBits settings, chosen by measurement. 4 bits, on the CPU config: +0.0061 nats of validation loss
# at block 32, +0.0056 at 64, +0.0079 at 128; so blocks of 64 where the width allows it, as they cost the
# same bits as llama.cpp's Q4_0 (4 + 32/64 per weight with fp32 scales, against 4 + 16/32), else 32.
# 8 bits lose nothing measurable at any block (+0.0003 nats at 64, -0.0000 at 256), and onnxruntime's
# 8-bit kernel runs faster on longer blocks (seed size, AVX2, same run: blocks of 256 against 64 took
# 2.84 against 3.00 ms a decode step and 84 against 100 ms for a 128-token prefill, medians of 10
# and 8), so 8 bits take the longest block of 256, 128, 64, 32 that divides the width. Accuracy level
# 4 (int8 activations in the kernel) decoded fastest at seed size.
NBITS_BLOCKS, NBITS_ACCURACY = {4: (64, 32), 8: (256, 128, 64, 32)}, 4


def nbits_block(width: int, bits: int = 4) -> int | None:
    """The block MatMulNBits quantizes a model of this embedding width in at `bits` (None: no block divides it)."""
    return next((b for b in NBITS_BLOCKS[bits] if width % b == 0), None)


# What quantize_nbits rewrites:
# - every MatMul with a constant 2-D weight becomes MatMulNBits (a bias added right after, a constant
#   Add with no other reader, becomes its bias input);
# - a tied head (a MatMul by the embedding table's transpose, as a Transpose node or as an equal copy)
#   becomes MatMulNBits on the table's blocks, and the table's Gather becomes GatherBlockQuantized on
#   the same bytes: one copy at `bits` serves both ends, as one fp32 copy does in the model;
# - every other embedding table (a Gather on a constant 2-D table: the positions, an untied token
#   table) becomes GatherBlockQuantized at 8 bits, which loses nothing measurable (on the CPU config,
#   4-bit tables added 0.004 nats) and costs nothing per token: a lookup dequantizes one row.
# Written here rather than through onnxruntime's MatMulNBitsQuantizer, which loads the whole fp32 model
# and builds the new one beside it: this reads one weight at a time from the source and streams the
# result to DST.data (packed into DST when small), so a GPT-2-large graph is never in memory.

def quantize_nbits(src: Path, dst: Path, bits: int, block: int) -> None:
    """Weight-only quantization to `bits` bits in blocks of `block` along K, symmetric, with
    onnxruntime's own C++ quantizer for the values: MatMulNBits and GatherBlockQuantized (see above)."""
    from onnx import helper

    model = onnxfile.load(src, weights=False)
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    biases = _foldable_biases(graph, consts)
    tables = {n.input[0] for n in graph.node if _is_table_gather(n, consts, block)}
    tied = _tied_heads(graph, consts, tables, src.parent)
    weights = onnxfile.WeightFile(dst, external=True)
    nodes, inits, folded, blocks, reshaped = [], [], set(), {}, set()
    shared = set(tied.values())

    def quantized(name: str, width: int = bits, transposed: bool = False) -> tuple[str, str]:
        """Initializer `name` (K, N), or (N, K) when `transposed` (a table), as MatMulNBits blocks of
        `width` bits: read, quantized and written once."""
        if name not in blocks:
            weight = onnxfile.read_tensor(consts[name], src.parent)
            packed, scales = _quantize_block(weight.T if transposed else weight, width, block)
            blocks[name] = (f"{name}_Q{width}", f"{name}_scales")
            inits.extend([weights.tensor(blocks[name][0], packed), weights.tensor(blocks[name][1], scales)])
        return blocks[name]

    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in tables:
            rows, width_in = consts[node.input[0]].dims
            width = bits if node.input[0] in shared else 8
            packed, scales = quantized(node.input[0], width, transposed=True)
            if packed not in reshaped:
                reshaped.add(packed)
                inits.append(helper.make_tensor(f"{packed}_rows_shape", 7, [2], [rows, width_in * width // 8]))
                nodes.append(helper.make_node("Reshape", [packed, f"{packed}_rows_shape"], [f"{packed}_rows"]))
            nodes.append(_gather_quantized(node, f"{packed}_rows", scales, width, block))
            continue
        b = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        if node.op_type == "MatMul" and node.output[0] in tied:
            n, k = consts[tied[node.output[0]]].dims
            packed, scales = quantized(tied[node.output[0]], transposed=True)
        elif b is not None and len(b.dims) == 2 and b.dims[0] % block == 0:
            k, n = b.dims
            packed, scales = quantized(b.name)
        else:
            nodes.append(node)
            continue
        bias = biases.get(node.output[0])  # MatMulNBits(A, B, scales, zero_points, g_idx, bias)
        inputs = [node.input[0], packed, scales] + (["", "", bias[1]] if bias else [])
        output = bias[0].output[0] if bias else node.output[0]
        if bias:
            folded.add(output)
        nodes.append(helper.make_node("MatMulNBits", inputs, [output], name=f"{node.name}_Q{bits}", K=k, N=n,
                                      domain="com.microsoft", bits=bits, block_size=block,
                                      accuracy_level=NBITS_ACCURACY))
    nodes = [n for n in nodes if not (n.op_type == "Add" and n.output[0] in folded)]  # now MatMulNBits' bias
    _write(model, _live(nodes, {o.name for o in graph.output}), inits, consts, weights, src, dst)


def _write(model, nodes: list, inits: list, consts: dict, weights, src: Path, dst: Path) -> None:
    """The rewritten graph: its nodes, the new initializers and the old ones still read, to DST."""
    from onnx import helper

    read = {name for n in nodes for name in n.input}
    made = {t.name for t in inits}
    inits += [weights.tensor(name, onnxfile.read_tensor(t, src.parent)) for name, t in consts.items()
              if name in read and name not in made]
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    weights.close()
    onnxfile.resave(model, dst)


def _gather_quantized(node, rows: str, scales: str, bits: int, block: int):
    """A Gather of table rows as GatherBlockQuantized of `rows`, the table's MatMulNBits blocks seen as
    (rows, width * bits / 8): the same bytes, the shape GatherBlockQuantized reads."""
    from onnx import helper

    return helper.make_node("GatherBlockQuantized", [rows, node.input[1], scales], list(node.output),
                            name=f"{node.name}_Q{bits}", domain="com.microsoft", bits=bits, block_size=block,
                            gather_axis=0, quantize_axis=1)


def _is_table_gather(node, consts: dict, block: int) -> bool:
    """A Gather along rows of a constant 2-D table whose width the block divides: an embedding."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    table = consts.get(node.input[0]) if node.op_type == "Gather" else None
    return table is not None and len(table.dims) == 2 and axis == 0 and table.dims[1] % block == 0


def _tied_heads(graph, consts: dict, tables: set, folder: Path) -> dict:
    """MatMul output -> the table it multiplies by transposed: through a Transpose node (as the traced
    graph has it), or a constant equal to the table's transpose (as the fused graph has it)."""
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in tables
                  and [a.ints for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    tied = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        if node.input[1] in transposed:
            tied[node.output[0]] = transposed[node.input[1]]
            continue
        b = consts.get(node.input[1])
        for name in tables:
            table = consts[name]
            if b is not None and list(b.dims) == list(table.dims)[::-1] and np.array_equal(
                    onnxfile.read_tensor(b, folder), onnxfile.read_tensor(table, folder).T):
                tied[node.output[0]] = name
    return tied


def _live(nodes: list, outputs: set) -> list:
    """The nodes a graph output depends on, in their order (a Transpose left unread by a tied head goes)."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


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


def _quantize_block(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32 -> MatMulNBits' packed blocks (N, K/block, block*bits/8) and scales (N, K/block)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = weight.shape
    blocks = k // block
    packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)  # unused: symmetric
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, weight, scales, zero_points, block, n, k, True)
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


NBITS = {"int4": 4, "int8w": 8}  # the weight-only variants (quantize_nbits) and their bits
MAKERS = {"int8": quantize_int8, "fp16": convert_fp16}


def write_variant(config, folder: Path, variant: str, opset: int, model=None) -> Path:
    """Write `variant` (int8, fp16, int4, int8w, or fused-... of each) into `folder` from the graph it
    derives from, already there (the fused fp16 graph from `model`, a gpt.model.GPT); returns its path.
    Its weights are in NAME.onnx.data: the caller checks the graph, then export.onnxfile.finish packs
    them in when they are under the threshold."""
    fused = variant.startswith("fused-")
    kind = variant.removeprefix("fused-")
    source, target = folder / VARIANTS["fused" if fused else "fp32"], folder / VARIANTS[variant]
    if fused and kind == "fp16":  # written directly: GroupQueryAttention's cache must be fp16 too
        build_fused(model, target, opset=opset, dtype="float16")
    elif kind in NBITS:
        quantize_nbits(source, target, NBITS[kind], nbits_block(config.embedding_dim, NBITS[kind]))
    else:
        MAKERS[kind](source, target)
    return target
