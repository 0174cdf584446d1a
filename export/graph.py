"""The portable graph traced by torch.onnx (`--exporter dynamo|torchscript`), and every graph's check.

The export writes the portable graph with export/portable.py by default; tracing `gpt/model.py`
gives the same graph from the code as it is, at the cost of a minute at GPT-2 small.

    ExportGraph      the graph's signature: named tensors in and out, in the Optimum convention
    trace()          the dynamo exporter (TorchScript only when asked for, and said in the manifest); the
                     weights in NAME.onnx.data past the external-data threshold (export/onnxfile.py)
    trace_checkpoint() the same in a Python of its own, for big models (the exporter keeps the model)
    check_graph()    onnx's full checker, no `If` node, and a description of the graph for the manifest

The graph has no `If` node: a zero-length past is the prefill case.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from export import onnxfile
from export.onnxfile import EXTERNAL_DATA_ABOVE
from gpt.config import ModelConfig
from gpt.model import GPT
from serve.manifest import LOGITS_TO_KEEP, ExportError, input_names, output_names


class ExportGraph(nn.Module):
    """The graph's signature: named tensors in, named tensors out, in the Optimum convention."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        past = [(k, v) for k, v in past_key_values]
        out = self.model(input_ids, past=past, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True)
        return out.logits, [(k, v) for k, v in out.present]


def example_inputs(c: ModelConfig, batch: int, seq: int, past: int, left_pad: int = 0, seed: int = 0):
    """Inputs for the graph: `past` cached tokens and `seq` new ones, the first `left_pad` of them padding
    (the same for the same arguments: the gates make them again to check each graph)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[:, :left_pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    cache = [(torch.randn(batch, c.kv_heads, past, c.head_dim, generator=g),
              torch.randn(batch, c.kv_heads, past, c.head_dim, generator=g)) for _ in range(c.num_layers)]
    return ids, mask, positions, cache


TRACERS = ("dynamo", "torchscript")
EXPORTERS = ("builder", *TRACERS)  # the builder (export/portable.py, the default) traces nothing


def trace(model: GPT, path: Path, opset: int, exporter: str = "dynamo",
          external_data_above: int = EXTERNAL_DATA_ABOVE) -> str:
    """Trace `model` to `path`, its weights in PATH.data (the caller checks the graph, then packs them
    in with export.onnxfile.finish when under the threshold), with the exporter asked for: dynamo
    (torch.export, the default), or torchscript, the older exporter, only
    when asked (`--exporter torchscript`). Returns a line for the manifest saying which ran."""
    if exporter not in TRACERS:
        raise ExportError(f"--exporter {exporter!r} does not trace: use one of {', '.join(TRACERS)}")
    graph = ExportGraph(model).eval()
    # example sizes for dynamic dims must not be 0 or 1, or the exporter specialises on them
    args = example_inputs(model.config, batch=2, seq=3, past=4)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if exporter == "dynamo":
                _dynamo(graph, args, path, opset)
            else:
                _torchscript(graph, args, path, opset, external_data_above)
    except ExportError:
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        fix = ("export with --exporter torchscript (the older exporter; the manifest records it)"
               if exporter == "dynamo" else "export with --exporter dynamo")
        raise ExportError(f"the {exporter} exporter failed ({error}); {fix}") from e
    _name_mask_dim(path)
    return exporter


# Past this many bytes of weights the trace runs in a process of its own (trace_checkpoint): the
# exporter keeps references to the model it traced (torch.export's graph holds its parameters) after
# it returns, and only the end of a process gives that memory back.
TRACE_APART_ABOVE = 2**26


def trace_checkpoint(folder: Path, path: Path, opset: int, exporter: str = "dynamo",
                     external_data_above: int = EXTERNAL_DATA_ABOVE) -> str:
    """`trace` of the checkpoint in `folder`, in a fresh Python (with this one's import path and torch
    threads) that loads the model itself: when it exits, all the memory the trace took is back. An
    ExportError there is raised here, the same line."""
    import os
    import subprocess
    import sys

    code = "import sys; from export.graph import _trace_apart; _trace_apart(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    args = [str(folder), str(path), str(opset), exporter, str(external_data_above), str(torch.get_num_threads())]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    last = (proc.stderr.strip().splitlines() or ["it printed nothing"])[-1]
    if proc.returncode == 2:  # an ExportError, in its one line
        raise ExportError(last)
    if proc.returncode:
        raise ExportError(f"the trace's process failed with exit code {proc.returncode} ({last[:300]}); run the "
                          "export again, and report it if it fails the same way")
    return proc.stdout.strip().splitlines()[-1]


def _trace_apart(argv: list[str]) -> None:
    """trace_checkpoint's other side: trace, print which exporter ran, or the ExportError and exit 2."""
    import sys

    from gpt.checkpoint import load_checkpoint

    folder, path, opset, exporter, above, threads = argv
    torch.set_num_threads(int(threads))
    try:
        model, _, _ = load_checkpoint(folder)
        print(trace(model.float().eval(), Path(path), int(opset), exporter, int(above)))
    except ExportError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


def _dynamo(graph: ExportGraph, args, path: Path, opset: int) -> None:
    """torch.export, then onnxscript's optimizer; the weights are written to PATH.data a tensor at a
    time (held once, by the model), and packed back into one file by the caller when they are small."""
    from torch.export import Dim

    L = graph.model.config.num_layers
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    cache_shape = {0: batch, 2: past}
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},  # past + sequence: related by the graph itself
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [(cache_shape, cache_shape) for _ in range(L)],
    }
    torch.onnx.export(graph, (args[0], args[1], args[2], args[3]), str(path), dynamo=True, external_data=True,
                      dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True,
                      input_names=input_names(L), output_names=output_names(L))


def _torchscript(graph: ExportGraph, args, path: Path, opset: int, external_data_above: int) -> None:
    """The TorchScript exporter writes a big model as one file per tensor: it writes into a scratch
    folder, and the graph is saved again as NAME.onnx (+ NAME.onnx.data)."""
    import shutil

    L = graph.model.config.num_layers
    names = dict(input_names=input_names(L), output_names=output_names(L))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in names["input_names"][3:]:
        axes[n] = {0: "batch", 2: "past_sequence"}
    for n in names["output_names"][1:]:
        axes[n] = {0: "batch", 2: "total_sequence"}
    scratch = path.parent / f".{path.name}.torchscript"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        torch.onnx.export(graph, (args[0], args[1], args[2], args[3]), str(scratch / path.name), dynamo=False,
                          dynamic_axes=axes, opset_version=opset, **names)
        onnxfile.save(onnxfile.load(scratch / path.name), path, external_data_above)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _name_mask_dim(path: Path) -> None:
    """Give attention_mask's length the name the exporter gave the present outputs' length."""
    model = onnxfile.load(path, weights=False)
    dim = next(i for i in model.graph.input if i.name == "attention_mask").type.tensor_type.shape.dim[1]
    old, new = dim.dim_param, "past_sequence + sequence"
    if not old or old == new:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = new
    onnxfile.resave(model, path)


def check_graph(path: Path) -> dict:
    """onnx's full checker, and the promise that prefill and decode share one graph without `If`."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # by path: a graph with external data is checked too
    model = onnxfile.load(path, weights=False)
    ops: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)

    walk(model.graph)
    if "If" in ops:
        raise ExportError(f"{path.name} has {ops['If']} If node(s): the export must be one straight graph")

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [{"name": v.name, "shape": shape(v)} for v in model.graph.input if v.name != LOGITS_TO_KEEP],
        "logits_to_keep": any(v.name == LOGITS_TO_KEEP for v in model.graph.input),
        "outputs": [{"name": v.name, "shape": shape(v)} for v in model.graph.output],
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
    }

