"""Generation with onnxruntime alone: an export folder's graph in one session, with its KV cache.

`OnnxModel` wraps one session. Inputs and outputs go through IO binding, so the cache (`present`
of one step is `past_key_values` of the next) stays where the model runs, on the GPU with CUDA,
and only the last logits come back to the host. The rest of the room:

    serve/cache.py     the preallocated cache of the fused graph (CacheBuffers, CacheView)
    serve/manifest.py  the export folder's contract, read and checked
    serve/batch.py     sequences and the batches that decode them together (make_batch)
    serve/generate.py  generate(): prompts continued by a batch; warmup()

Imports run one way: cache and manifest <- runtime <- scoring <- batch <- generate.

Imports no torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from serve.cache import CacheBuffers, CacheView
from serve.manifest import (
    LOGITS_TO_KEEP,
    DeviceError,
    ExportError,
    check_manifest,
    manifest_tokenizer,
    model_path,
    read_manifest,
)


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ort():
    import onnxruntime

    return onnxruntime


def check_device(device: str, variant: str, shared_cache: bool, cache_dtype: np.dtype) -> None:
    """The device must be known, able to run this graph, and present in this onnxruntime."""
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is unknown: use cpu or cuda")
    if device == "cuda" and shared_cache and cache_dtype != np.float16:
        raise DeviceError(f"the {variant} graph's GroupQueryAttention has no fp32 CUDA kernel: on cuda use the "
                          "fp16 fused graph (--model fused-fp16, written by `python -m export RUN_DIR DIR "
                          "--optimize --fp16`) or the portable one (--model fp32)")
    if device == "cuda" and "CUDAExecutionProvider" not in _ort().get_available_providers():
        raise DeviceError(
            "device cuda needs onnxruntime-gpu, and this onnxruntime has only "
            f"{', '.join(_ort().get_available_providers())}: "
            'pip uninstall -y onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]"'
        )


class OnnxModel:
    """One onnxruntime session over an export folder, with the cache kept on the device."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int = 0, variant: str = "fp32",
                 tf32: bool = False, manifest: dict | None = None):
        """`manifest`: one held in memory instead of the folder's manifest.json (checked the same way),
        as the exporter does while the folder is being written."""
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir) if manifest is None else check_manifest(export_dir, manifest)
        if variant == "auto":
            variant = auto_variant(self.manifest, device)
        self.tokenizer = manifest_tokenizer(export_dir, self.manifest)
        config = self.manifest["model"]
        # the cache's heads: num_heads, or a llama's fewer key/value heads (grouped-query attention)
        self.num_layers, self.num_heads = config["num_layers"], config.get("num_kv_heads") or config["num_heads"]
        self.head_dim = config["embedding_dim"] // config["num_heads"]
        self.block_size, self.vocab_size = config["block_size"], config["vocab_size"]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        # "shared": one preallocated buffer is both past and present (the fused graph); "concat": the
        # graph returns a new, longer cache every call (the portable graph)
        graph = self.manifest.get("graphs", {}).get(variant, {})
        self.shared_cache = graph.get("cache") == "shared"
        self.cache_dtype = np.dtype(np.float16 if graph.get("cache_dtype") == "float16" else np.float32)
        self.variant, self.tf32, self.device = variant, tf32, device
        check_device(device, variant, self.shared_cache, self.cache_dtype)
        started = time.perf_counter()
        self.path = model_path(export_dir, self.manifest, variant)
        self.session = self._open_session(self.path, threads)
        self.load_seconds = time.perf_counter() - started
        self._check_graph()
        # Graphs this exporter builds can compute the last position's logits alone (a prefill's need);
        # traced ones compute every position's
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self._keep = {n: _ort().OrtValue.ortvalue_from_numpy(np.array([n], np.int64)) for n in (0, 1)}

    def describe_load(self) -> str:
        """What was loaded, how long it took and the process's resident memory after it, in one line."""
        data = self.path.with_name(self.path.name + ".data")
        size = self.path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        return (f"loaded {self.path.name}{' + ' + data.name if data.is_file() else ''} ({size / 2**20:.0f} MiB) in "
                f"{self.load_seconds:.2f} s; resident memory {resident_bytes() / 2**20:.0f} MiB")

    def _open_session(self, path: Path, threads: int) -> Any:
        """The onnxruntime session, on the device asked for or not at all."""
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # errors only: onnxruntime warns at every load that logits_to_keep, an input with a default, is
        # no constant (it is meant not to be)
        options.log_severity_level = 3
        # onnxruntime's CUDA provider uses TF32 for fp32 matmuls unless told not to: off by default,
        # so an fp32 model gives the logits (and the tokens) that the parity checks compare.
        cuda = ("CUDAExecutionProvider", {"use_tf32": "1" if self.tf32 else "0"})
        providers = [cuda, "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            if not self.shared_cache:
                raise
            # the fused graph uses onnxruntime's contrib ops, whose attributes grow between releases
            raise ExportError(f"onnxruntime {ort.__version__} cannot load the fused graph {path.name} "
                              f"({str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}): "
                              "upgrade onnxruntime (the export was checked with the version in its manifest), or "
                              "use the portable graph (--model fp32)") from None
        # What is built in is not what a session gets: without the CUDA and cuDNN libraries
        # onnxruntime-gpu quietly falls back to the CPU. Check what this session really runs on.
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise DeviceError(
                "onnxruntime-gpu could not start its CUDA provider, so the session fell back to the CPU: it needs "
                "the CUDA 12 and cuDNN 9 libraries (libcudart.so.12, libcublasLt.so.12, libcudnn.so.9) on the "
                'library path; pip install "onnxruntime-gpu[cuda,cudnn]" brings them (onnxruntime\'s log above '
                "names the one it missed)"
            )
        return session

    def _check_graph(self) -> None:
        """The graph must be the one the manifest describes, or decoding fails later for every client."""
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != self.input_names or graph_outputs != self.output_names:
            raise ExportError(f"{self.export_dir}: the {self.variant} graph's inputs and outputs differ from the "
                              "manifest's; the folder mixes two exports: export again")
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != self.vocab_size:
            raise ExportError(f"{self.export_dir}: the {self.variant} graph gives {width} logits per token but the "
                              f"vocabulary has {self.vocab_size} tokens; the folder mixes two exports: export again")

    def cache_bytes(self, slots: int) -> int:
        """Bytes of a shared-cache graph's preallocated cache with `slots` slots: keys and values of every layer."""
        per_layer = 2 * self.num_heads * self.block_size * self.head_dim * self.cache_dtype.itemsize
        return slots * self.num_layers * per_layer

    # Cache helpers. A "concat" graph's cache is a list of 2 * num_layers OrtValues, each (B, H, P, D);
    # a "shared" graph's is a CacheView: B slots of preallocated (H, block_size, D) buffers.
    def to_device(self, arrays: Iterable[np.ndarray], length: int | None = None) -> Any:
        """A cache on the device holding `arrays` (B, H, P, D); a shared-cache graph's in fresh slots of
        `length` positions (default block_size), the arrays in their first P."""
        arrays = list(arrays)
        if self.shared_cache:
            buffers = CacheBuffers(self, arrays[0].shape[0] if arrays else 0, host=arrays, length=length)
            return buffers.view(0, buffers.slots)
        ort = _ort()
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in arrays]

    def to_host(self, cache: Any) -> list[np.ndarray]:
        if isinstance(cache, CacheView):
            return cache.host()
        return [v.numpy() for v in cache]

    def empty_cache(self, batch: int) -> Any:
        if self.shared_cache:
            return CacheBuffers(self, batch).view(0, batch)
        shape = (batch, self.num_heads, 0, self.head_dim)
        return self.to_device(np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers))

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Any, last_only: bool = False) -> tuple[np.ndarray, Any]:
        """One forward: logits (B, T, V) on the host, and the cache on the device. `last_only`: the
        last position's logits alone, (B, 1, V), where the graph can (`keeps_logits`), else all.

        A concat graph returns a new, extended cache. A shared-cache graph writes the new keys and
        values into `past` (a CacheView) in place and returns it; its attention_mask is right-padded
        (row b has a 1 for each of its cached and new tokens, then 0s)."""
        binding = past.binding() if self.shared_cache else self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        last_only = last_only and self.keeps_logits
        if self.keeps_logits:  # always bound: the binding may be a view's, reused by the next call
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[int(last_only)])
        if self.shared_cache:  # the cache is bound already; the logits land in an array of ours
            logits = np.empty((len(input_ids), 1 if last_only else input_ids.shape[1], self.vocab_size), np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self.session.run_with_iobinding(binding)
            return logits, past
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.input_names[3:], past):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])


def auto_variant(manifest: dict, device: str) -> str:
    """The exact (unquantized) model that runs fastest on `device` among those the folder holds: the
    fused graph (fp16 on cuda, where its attention op needs it), else the portable fp32 one."""
    files = manifest["files"]
    fused = "fused-fp16" if device == "cuda" else "fused"
    return fused if fused in files else "fp32"
