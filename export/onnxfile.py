"""An ONNX graph on disk: `NAME.onnx`, and its weights in one `NAME.onnx.data` beside it when they are big.

protobuf cannot serialize a message over 2 GiB, so a graph whose weights pass that size keeps them in
an external data file (ONNX's external-data convention: each initializer names the file, an offset
and a length). Here every graph is at most two files, whatever wrote it:

    save()             a ModelProto to NAME.onnx, its weights to NAME.onnx.data past the threshold
    WeightFile         weights streamed straight to NAME.onnx.data as a graph is built, so a big graph
                       is never held in memory twice (the fused builder and the 4/8-bit quantizer write
                       through one; the tracer writes external data too)
    finish()           a graph written that way: kept as two files past the threshold, else packed into
                       one NAME.onnx a tensor at a time (pack()); its files' entry for the manifest
    load(), read_tensor()   a graph, with or without its weights; one initializer's values
    data_file()        NAME.onnx.data, where a graph's external weights live
    describe_files()   the manifest's entry for a graph's files: sizes, and the sha256 of each

Packing relies on a rule of protobuf's wire format: a message field that appears several times is
merged, its repeated fields concatenated. So NAME.onnx can be written as the graph without its
weights followed by one `graph { initializer {...} }` record per tensor, which every protobuf parser
(onnx's, onnxruntime's) reads as one graph, and no step holds the whole serialized model in memory.

The threshold is a setting (`export(..., external_data_above=...)`, `--external-data-above`): by
default what protobuf allows, with room for the graph itself; a tiny model in a test sets it low to
take the external-data path. Each tensor in the data file starts at a multiple of ALIGN bytes, so
onnxruntime can map it from the file instead of copying it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_ABOVE = 2**31 - 2**26  # what protobuf allows, less 64 MiB for the graph's nodes and small constants
INLINE_BELOW = 1024  # tensors under this many bytes stay in the graph (biases of tiny models, shapes)
ALIGN = 4096  # a page: onnxruntime maps external data from the file when the offset allows it


def data_file(path: Path) -> Path:
    """Where a graph's external data lives: NAME.onnx.data beside NAME.onnx."""
    return path.with_name(path.name + ".data")


def weight_bytes(model) -> int:
    """Bytes of the initializers held in a ModelProto (external ones count as their recorded length)."""
    from onnx.external_data_helper import uses_external_data

    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def save(model, path: Path, external_data_above: int = EXTERNAL_DATA_ABOVE) -> Path | None:
    """Write `model` to `path`, with its weights in NAME.onnx.data when they pass `external_data_above`
    bytes; a data file left from an earlier attempt is removed first. Returns the data file, if any."""
    import onnx

    data = data_file(path)
    data.unlink(missing_ok=True)
    if weight_bytes(model) <= external_data_above:
        onnx.save(model, str(path))
        return None
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=INLINE_BELOW)
    return data


def load(path: Path, weights: bool = True):
    """A graph from disk, its external weights read in only when asked for."""
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def resave(model, path: Path) -> None:
    """Write back a graph loaded with `load(path, weights=False)` after editing its nodes: the data file
    it refers to is left as it is."""
    import onnx

    onnx.save(model, str(path))


def read_tensor(tensor, folder: Path) -> np.ndarray:
    """One initializer's values, read from its external data file (by offset) or from the graph."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    name = info["location"]
    if name != Path(name).name:
        raise ValueError(f"tensor {tensor.name} points outside its folder ({name})")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(info["length"]) // dtype.itemsize
    array = np.fromfile(folder / name, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return array.reshape(tuple(tensor.dims))


def finish(path: Path, external_data_above: int = EXTERNAL_DATA_ABOVE) -> dict:
    """A graph written with external data: kept so past `external_data_above` bytes of weights, else
    packed into one file. Returns its files' entry for the manifest (describe_files)."""
    data = data_file(path)
    if not data.is_file() or weight_bytes(load(path, weights=False)) > external_data_above:
        return describe_files(path)
    digest = pack(path)
    return {"bytes": path.stat().st_size, "sha256": digest}


def pack(path: Path) -> str:
    """Fold NAME.onnx.data into NAME.onnx, one tensor at a time (see the module's note on merging);
    returns the packed file's sha256, taken as it is written. Each tensor's bytes go from the data
    file to the graph file without another copy: its record is written as protobuf encodes it, the
    TensorProto's other fields, then raw_data (field 9). Nothing is flushed here: the export flushes
    its folder once, when it publishes it, and a data file packed away need never reach the disk."""
    import hashlib

    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data

    model = load(path, weights=False)
    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    tmp, digest = path.with_name(f".{path.name}.packing"), hashlib.sha256()
    with open(tmp, "wb") as f:
        def write(data) -> None:
            digest.update(data)
            f.write(data)

        write(model.SerializeToString())
        for t in tensors:
            if uses_external_data(t):
                raw = memoryview(read_tensor(t, path.parent).reshape(-1)).cast("B")
                t = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            else:
                raw = b""
            tensor = t.SerializeToString() + (_field(9, len(raw)) if raw else b"")
            tensor_len = len(tensor) + len(raw)
            initializer = _field(5, tensor_len)  # GraphProto.initializer
            write(_field(7, len(initializer) + tensor_len) + initializer + tensor)  # ModelProto.graph
            write(raw)
    os.replace(tmp, path)
    data_file(path).unlink()
    return digest.hexdigest()


def _field(number: int, length: int) -> bytes:
    """A length-delimited field's key and length, as protobuf encodes them."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class WeightFile:
    """Initializers for a graph being built, each written to NAME.onnx.data as it comes (aligned to
    ALIGN bytes), or kept in memory when `external` is False. `tensor()` returns the TensorProto to put
    in the graph: raw bytes, or a reference into the data file."""

    def __init__(self, path: Path, external: bool):
        self.path, self.external = data_file(path), external
        self.path.unlink(missing_ok=True)
        self.file = open(self.path, "wb") if external else None
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper, numpy_helper

        array = np.require(array, requirements="C")  # (ascontiguousarray would make a scalar 1-D)
        if not self.external or array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        array.tofile(self.file)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return t

    def close(self) -> Path | None:
        """Close the data file (the export flushes its folder to disk when it publishes it); returns
        it, or None when nothing was written to one."""
        if self.file is None:
            return None
        self.file.close()
        self.file = None
        return self.path


def describe_files(path: Path) -> dict:
    """A graph's files for the manifest: the graph's size and sha256, and its data file's, if any."""
    from gpt.files import sha256_file

    entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    data = data_file(path)
    if data.is_file():
        entry["data"] = {"file": data.name, "bytes": data.stat().st_size, "sha256": sha256_file(data)}
    return entry
