"""Generation with onnxruntime alone: the exported graph, a KV cache, and a batch of sequences.

`OnnxModel` wraps one session. Inputs and outputs go through IO binding, so the cache (`present`
of one step is `past_key_values` of the next) stays where the model runs, on the GPU with CUDA,
and only the last logits come back to the host.

`Batch(model)` decodes many sequences in one call per step; the server's continuous batching is
this. Sequences join, leave (finished) and refill their window past `block_size` (the
`gpt.sampling.refill_context` policy of the PyTorch reference) between steps. Two kinds, one per
kind of graph:

- `SlotBatch`, for the fused graph (`cache: shared` in the manifest): the cache is allocated once,
  one slot of `block_size` positions per sequence, and bound as both past and present, so the
  attention op writes each new key and value in place. A sequence joins by prefilling alone into
  a free slot and leaves by freeing it: nothing is copied, on the host or on the device.
- `PaddedBatch`, for the portable graph (`cache: concat`): the graph returns a longer cache each
  step. Sequences are left-padded: the attention mask marks real tokens, and each sequence's
  positions count its own real tokens. Joining and leaving rebuild the cache through the host.

Either way a sequence gets the same logits in a batch as alone.

Imports no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt.sampling import SamplingParams, refill_context, sample
from gpt.tokenizer import StreamDecoder, Tokenizer
from serve.manifest import DeviceError, ExportError, manifest_tokenizer, model_path, read_manifest


def _ort():
    import onnxruntime

    return onnxruntime


class OnnxModel:
    """One onnxruntime session over an export folder, with the cache kept on the device."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int = 0, variant: str = "fp32",
                 tf32: bool = False):
        ort = _ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir)
        if variant == "auto":
            variant = auto_variant(self.manifest, device)
        self.tokenizer = manifest_tokenizer(export_dir, self.manifest)
        config = self.manifest["model"]
        self.num_layers, self.num_heads = config["num_layers"], config["num_heads"]
        self.head_dim = config["embedding_dim"] // config["num_heads"]
        self.block_size, self.vocab_size = config["block_size"], config["vocab_size"]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        # "shared": one preallocated buffer is both past and present (the fused graph); "concat": the
        # graph returns a new, longer cache every call (the portable graph)
        graph = self.manifest.get("graphs", {}).get(variant, {})
        self.shared_cache = graph.get("cache") == "shared"
        self.cache_dtype = np.dtype(np.float16 if graph.get("cache_dtype") == "float16" else np.float32)
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        if device not in ("cpu", "cuda"):
            raise DeviceError(f"device {device!r} is unknown: use cpu or cuda")
        if device == "cuda" and self.shared_cache and self.cache_dtype != np.float16:
            raise DeviceError(f"the {variant} graph's GroupQueryAttention has no fp32 CUDA kernel: on cuda use the "
                              "fp16 fused graph (--model fused-fp16, written by `python -m export RUN_DIR DIR "
                              "--optimize --fp16`) or the portable one (--model fp32)")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError(
                "device cuda needs onnxruntime-gpu, and this onnxruntime has only "
                f"{', '.join(ort.get_available_providers())}: "
                'pip uninstall -y onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]"'
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # onnxruntime's CUDA provider uses TF32 for fp32 matmuls unless told not to: off by default,
        # so an fp32 model gives the logits (and the tokens) that the parity checks compare.
        cuda = ("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})
        providers = [cuda, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.variant, self.tf32 = variant, tf32
        path = model_path(export_dir, self.manifest, variant)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
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
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise DeviceError(
                "onnxruntime-gpu could not start its CUDA provider, so the session fell back to the CPU: it needs "
                "the CUDA 12 and cuDNN 9 libraries (libcudart.so.12, libcublasLt.so.12, libcudnn.so.9) on the "
                'library path; pip install "onnxruntime-gpu[cuda,cudnn]" brings them (onnxruntime\'s log above '
                "names the one it missed)"
            )
        self.device = device
        self._check_graph()

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

    def warmup(self) -> None:
        """A short batched generation through every code path (prefill, splice, decode, sampling),
        so the first real request does not pay for initialisation."""
        batch = Batch(self, slots=2)
        batch.add([Sequence([0, 0], 3, SamplingParams(temperature=1.0)), Sequence([0], 3, SamplingParams(greedy=True))])
        while len(batch):
            batch.step()

    # Cache helpers. A "concat" graph's cache is a list of 2 * num_layers OrtValues, each (B, H, P, D);
    # a "shared" graph's is a CacheView: B slots of preallocated (H, block_size, D) buffers.
    def to_device(self, arrays: Iterable[np.ndarray]) -> Any:
        arrays = list(arrays)
        if self.shared_cache:  # (B, H, P, D) into the first P positions of fresh slots
            buffers = CacheBuffers(self, arrays[0].shape[0] if arrays else 0, host=arrays)
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
            past: Any) -> tuple[np.ndarray, Any]:
        """One forward: logits (B, T, V) on the host, and the cache on the device.

        A concat graph returns a new, extended cache. A shared-cache graph writes the new keys and
        values into `past` (a CacheView) in place and returns it; its attention_mask is right-padded
        (row b has a 1 for each of its cached and new tokens, then 0s)."""
        binding = past.binding() if self.shared_cache else self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.shared_cache:  # the cache is bound already; the logits land in an array of ours
            logits = np.empty((*input_ids.shape, self.vocab_size), np.float32)
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


class CacheBuffers:
    """The preallocated cache of a shared-cache graph: 2 * num_layers buffers of (slots, H, block_size, D)
    on the model's device. Slot s of every buffer holds one sequence's keys or values."""

    def __init__(self, model: OnnxModel, slots: int, host: list[np.ndarray] | None = None):
        self.model, self.slots = model, slots
        shape = (slots, model.num_heads, model.block_size, model.head_dim)
        arrays = [np.zeros(shape, model.cache_dtype) for _ in range(2 * model.num_layers)]
        for a, h in zip(arrays, host or []):
            a[:, :, :h.shape[2]] = h
        if model.device == "cpu":  # numpy memory, bound by address: the graph writes into these arrays
            self.arrays, self._pointers = arrays, [a.ctypes.data for a in arrays]
        else:
            ort = _ort()
            self.values = [ort.OrtValue.ortvalue_from_numpy(a, model.device, 0) for a in arrays]
            self._pointers = [v.data_ptr() for v in self.values]
        self.slot_bytes = model.cache_bytes(1) // len(arrays)  # one slot of one buffer
        self.bindings: dict[tuple[int, int], Any] = {}  # (start, count) -> an IOBinding with those slots bound

    def view(self, start: int, count: int) -> CacheView:
        return CacheView(self, start, count)

    def host(self) -> list[np.ndarray]:
        """A copy of every buffer on the host (tests and checks; decoding never calls this)."""
        if self.model.device == "cpu":
            return [a.copy() for a in self.arrays]
        return [v.numpy() for v in self.values]

    def grown(self, slots: int) -> CacheBuffers:
        """Buffers with more slots holding these slots' contents (a rare, whole-cache copy)."""
        return CacheBuffers(self.model, slots, host=[np.pad(a, ((0, slots - self.slots), (0, 0), (0, 0), (0, 0)))
                                                     for a in self.host()])


@dataclass
class CacheView:
    """Slots [start, start + count) of CacheBuffers: what one call binds as past and present."""

    buffers: CacheBuffers
    start: int
    count: int

    def pointers(self) -> list[int]:
        offset = self.start * self.buffers.slot_bytes
        return [p + offset for p in self.buffers._pointers]

    def binding(self) -> Any:
        """An IOBinding with these slots bound as past and present, made once per view and reused: a
        decode step binds only its three small inputs and the logits."""
        key = (self.start, self.count)
        binding = self.buffers.bindings.get(key)
        if binding is None:
            model = self.buffers.model
            binding = model.session.io_binding()
            shape = [self.count, model.num_heads, model.block_size, model.head_dim]
            for name_in, name_out, pointer in zip(model.input_names[3:], model.output_names[1:], self.pointers()):
                binding.bind_input(name_in, model.device, 0, model.cache_dtype, shape, pointer)
                binding.bind_output(name_out, model.device, 0, model.cache_dtype, shape, pointer)
            self.buffers.bindings[key] = binding
        return binding

    def host(self) -> list[np.ndarray]:
        return [a[self.start:self.start + self.count] for a in self.buffers.host()]


def auto_variant(manifest: dict, device: str) -> str:
    """The exact (unquantized) model that runs fastest on `device` among those the folder holds: the
    fused graph (fp16 on cuda, where its attention op needs it), else the portable fp32 one."""
    files = manifest["files"]
    fused = "fused-fp16" if device == "cuda" else "fused"
    return fused if fused in files else "fp32"


def validate_request(tokenizer: Tokenizer, prompt: str, max_new_tokens: int, limit: int,
                     max_prompt_tokens: int = 1 << 16) -> list[int]:
    """Token ids of a prompt, or a one-line ValueError naming what is wrong. Limits count tokens."""
    if not isinstance(prompt, str) or prompt == "":
        raise ValueError("prompt is empty: give at least one character, e.g. 'ROMEO:'")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer from 1 to {limit}")
    ids = tokenizer.encode(prompt)
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens}: send a shorter one "
                         "(the model sees at most its block_size of them anyway)")
    return ids


@dataclass
class Sequence:
    """One prompt being continued, with its own sampling settings and random stream."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    tag: Any = None  # the caller's handle (request id, index)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None  # "stop" or "length" once finished
    context: list[int] = field(default_factory=list)  # tokens the cache covers, plus the one to feed next
    decoder: StreamDecoder | None = None  # ids to complete characters (a token may end mid-character)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be forming

    def accept(self, token: int, piece: str) -> None:
        self.generated.append(token)
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:  # the stop string is not part of the completion
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return
        if len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"

    def take_text(self) -> str:
        """The text not yet handed out, holding back a possible start of a stop string."""
        upto = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self._hold)
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


@dataclass
class Event:
    sequence: Sequence
    text: str  # new text (may be empty)
    finished: bool


def Batch(model: OnnxModel, slots: int | None = None) -> PaddedBatch | SlotBatch:
    """The batch for this model's graph: slots in a preallocated cache for the fused graph, a padded,
    rebuilt cache for the portable one. `slots`: how many sequences at most (a SlotBatch grows past it)."""
    return SlotBatch(model, slots or 1) if model.shared_cache else PaddedBatch(model)


class _Batch:
    """Sequences decoded together, one onnxruntime call per step: what both kinds share."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.sequences: list[Sequence] = []
        self.logits = np.zeros((0, model.vocab_size), dtype=np.float32)  # (B, V): next-token logits, in order

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, sequences: list[Sequence]) -> None:
        raise NotImplementedError

    def remove(self, sequences: Iterable[Sequence]) -> None:
        raise NotImplementedError

    def advance(self) -> None:
        raise NotImplementedError

    # --- decoding --------------------------------------------------------------------------------

    # A step is emit() then advance(). Between them every remaining sequence has a sampled token
    # waiting to be fed; outside them every sequence has its next-token logits ready, and only then
    # may sequences be added or removed. Callers hand out emit()'s text before advance() runs the
    # model, so a token reaches its reader without waiting for the next forward pass.

    def step(self) -> list[Event]:
        """Sample one token for every sequence, retire the finished ones, and run the model once."""
        events = self.emit()
        self.advance()
        return events

    def emit(self) -> list[Event]:
        """Sample one token for every sequence and retire the finished ones."""
        events, finished = [], []
        tokenizer = self.model.tokenizer
        for i, s in enumerate(self.sequences):
            token = sample(self.logits[i], s.params, s.rng)
            if s.decoder is None:
                s.decoder = tokenizer.stream()
            if token == tokenizer.eot_id:  # the model ended the document: a natural stop, no text
                s.generated.append(token)
                s.finish_reason = "stop"
            else:
                s.accept(token, s.decoder.feed(token))
            if s.finish_reason == "length":
                s.text += s.decoder.flush()  # a character cut off by the limit shows as U+FFFD
            events.append(Event(s, s.take_text(), s.finish_reason is not None))
            if s.finish_reason:
                finished.append(s)
            else:
                s.context.append(token)
        self.remove(finished)
        return events


class PaddedBatch(_Batch):
    """The portable graph's batch: left-padded rows, a cache that the graph extends by Concat and that
    joining and leaving rebuild through the host."""

    def __init__(self, model: OnnxModel):
        super().__init__(model)
        self.cache: list[Any] | None = None  # on the device, (B, H, W, D)
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, W): 1 where the cache holds a real token

    # --- building the batch ----------------------------------------------------------------------

    def _prefill(self, contexts: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Run left-padded contexts from an empty cache: (host cache, mask, last logits)."""
        width = max(len(c) for c in contexts)
        B = len(contexts)
        if width == 0:
            shape = (B, self.model.num_heads, 0, self.model.head_dim)
            return ([np.zeros(shape, np.float32) for _ in range(2 * self.model.num_layers)],
                    np.zeros((B, 0), np.int64), np.zeros((B, self.model.vocab_size), np.float32))
        ids = np.zeros((B, width), np.int64)
        mask = np.zeros((B, width), np.int64)
        for i, c in enumerate(contexts):
            if c:
                ids[i, width - len(c):] = c
                mask[i, width - len(c):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        logits, present = self.model.run(ids, mask, positions, self.model.empty_cache(B))
        return self.model.to_host(present), mask, logits[:, -1]

    @staticmethod
    def _pad_left(arrays: list[np.ndarray], mask: np.ndarray, width: int) -> tuple[list[np.ndarray], np.ndarray]:
        extra = width - mask.shape[1]
        if extra == 0:
            return arrays, mask
        padded = [np.concatenate([np.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype), a], axis=2) for a in arrays]
        return padded, np.concatenate([np.zeros((mask.shape[0], extra), mask.dtype), mask], axis=1)

    def _host_state(self) -> list[np.ndarray]:
        return self.model.to_host(self.cache) if self.cache is not None else []

    def _set_state(self, host: list[np.ndarray], mask: np.ndarray) -> None:
        # drop leading columns that are padding for every sequence, so the cache is only as wide as needed
        keep = int(np.argmax(mask.any(axis=0))) if mask.size and mask.any() else mask.shape[1]
        host, mask = [a[:, :, keep:] for a in host], mask[:, keep:]
        self.cache, self.mask = (self.model.to_device(host) if self.sequences else None), mask

    def add(self, sequences: list[Sequence]) -> None:
        """Prefill new sequences together and splice them into the batch."""
        if not sequences:
            return
        for s in sequences:
            s.context = list(s.prompt_ids[-self.model.block_size:])
        host_new, mask_new, logits_new = self._prefill([s.context for s in sequences])
        if self.sequences:
            host_old, mask_old = self._host_state(), self.mask
            width = max(mask_old.shape[1], mask_new.shape[1])
            host_old, mask_old = self._pad_left(host_old, mask_old, width)
            host_new, mask_new = self._pad_left(host_new, mask_new, width)
            host = [np.concatenate([a, b], axis=0) for a, b in zip(host_old, host_new)]
            mask = np.concatenate([mask_old, mask_new], axis=0)
            self.logits = np.concatenate([self.logits, logits_new], axis=0)
        else:
            host, mask, self.logits = host_new, mask_new, logits_new
        self.sequences += sequences
        self._set_state(host, mask)

    def remove(self, sequences: Iterable[Sequence]) -> None:
        gone = {id(s) for s in sequences}
        keep = [i for i, s in enumerate(self.sequences) if id(s) not in gone]
        if len(keep) == len(self.sequences):
            return
        host = [a[keep] for a in self._host_state()]
        self.sequences = [self.sequences[i] for i in keep]
        self.logits = self.logits[keep]
        self._set_state(host, self.mask[keep])

    def advance(self) -> None:
        """Feed every sequence its sampled token: one model call for the whole batch."""
        if not self.sequences:
            return
        # A sequence whose window is full restarts its cache from the last half of its context
        # (everything but the token fed below), as the PyTorch reference does.
        full = [i for i, s in enumerate(self.sequences) if len(s.context) > self.model.block_size]
        if full:
            for i in full:
                s = self.sequences[i]
                s.context = refill_context(s.context, self.model.block_size)
            host, mask = self._host_state(), self.mask
            host_new, mask_new, _ = self._prefill([self.sequences[i].context[:-1] for i in full])
            width = max(mask.shape[1], mask_new.shape[1])
            host, mask = self._pad_left(host, mask, width)
            host_new, mask_new = self._pad_left(host_new, mask_new, width)
            for j, i in enumerate(full):
                for a, b in zip(host, host_new):
                    a[i] = b[j]
                mask[i] = mask_new[j]
            self._set_state(host, mask)

        ids = np.array([[s.context[-1]] for s in self.sequences], np.int64)  # (B, 1)
        positions = np.array([[len(s.context) - 1] for s in self.sequences], np.int64)  # (B, 1)
        mask = np.concatenate([self.mask, np.ones((len(self.sequences), 1), np.int64)], axis=1)
        logits, self.cache = self.model.run(ids, mask, positions, self.cache)
        self.mask, self.logits = mask, logits[:, -1]


class SlotBatch(_Batch):
    """The fused graph's batch: each sequence owns a slot of a cache allocated once, which the graph
    writes in place.

    Joining prefills the sequence alone into the lowest free slot; leaving frees its slot; a refill
    past block_size prefills the shortened context into the same slot. A step runs slots [0, n), n
    one past the highest slot in use: a free slot among them decodes a dummy token at its position 0,
    which nothing reads. Rows are right-padded: row s of the mask has a 1 for each token slot s
    caches, and one for the token fed now.
    """

    def __init__(self, model: OnnxModel, slots: int):
        super().__init__(model)
        self.buffers = CacheBuffers(model, max(1, slots))
        self.slot_of: dict[int, int] = {}  # id(sequence) -> its slot
        self.free = list(range(self.buffers.slots))  # sorted: the lowest is taken first
        self.length = np.zeros(self.buffers.slots, np.int64)  # tokens cached in each slot

    def _take_slot(self) -> int:
        if not self.free:  # more sequences than slots: double the buffers (one copy, not per step)
            old = self.buffers.slots
            self.buffers = self.buffers.grown(2 * old)
            self.free = list(range(old, 2 * old))
            self.length = np.concatenate([self.length, np.zeros(old, np.int64)])
        return self.free.pop(0)

    def _prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        """Run `ids` alone into an empty slot, which then caches them; the last position's logits (V,)."""
        self.length[slot] = len(ids)
        if not ids:
            return np.zeros(self.model.vocab_size, np.float32)
        n = len(ids)
        logits, _ = self.model.run(np.array([ids], np.int64), np.ones((1, n), np.int64), np.arange(n)[None],
                                   self.buffers.view(slot, 1))
        return logits[0, -1]

    def add(self, sequences: list[Sequence]) -> None:
        """Prefill each new sequence alone into a free slot."""
        rows = []
        for s in sequences:
            s.context = list(s.prompt_ids[-self.model.block_size:])
            self.slot_of[id(s)] = slot = self._take_slot()
            rows.append(self._prefill(slot, s.context))
        if rows:
            self.sequences += sequences
            self.logits = np.concatenate([self.logits, np.stack(rows)])

    def remove(self, sequences: Iterable[Sequence]) -> None:
        gone = {id(s) for s in sequences}
        keep = [i for i, s in enumerate(self.sequences) if id(s) not in gone]
        if len(keep) == len(self.sequences):
            return
        for s in self.sequences:
            if id(s) in gone:
                slot = self.slot_of.pop(id(s))
                self.length[slot] = 0
                bisect.insort(self.free, slot)
        self.sequences = [self.sequences[i] for i in keep]
        self.logits = self.logits[keep]

    def advance(self) -> None:
        """Feed every sequence its sampled token: one model call for slots [0, n)."""
        if not self.sequences:
            return
        block = self.model.block_size
        for s in self.sequences:  # a full window restarts from the last half of its context, as in PyTorch
            if len(s.context) > block:
                s.context = refill_context(s.context, block)
                self._prefill(self.slot_of[id(s)], s.context[:-1])
        slots = np.array([self.slot_of[id(s)] for s in self.sequences])
        n = int(slots.max()) + 1
        ids = np.zeros((n, 1), np.int64)
        ids[slots, 0] = [s.context[-1] for s in self.sequences]
        positions = self.length[:n, None].copy()  # the fed token's position: the tokens before it
        lengths = self.length[:n] + 1
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)  # (n, T)
        logits, _ = self.model.run(ids, mask, positions, self.buffers.view(0, n))
        self.length[slots] += 1
        self.logits = logits[slots, -1]


def generate(model: OnnxModel, prompts: list[str] | str, max_new_tokens: int, params: SamplingParams | None = None,
             seed: int = 0, stop: list[str] | None = None, limit: int = 100_000) -> Iterator[Event]:
    """Continue one prompt or a batch of prompts, yielding text as it is generated.

    Every prompt draws from its own random stream seeded with `seed`, so a prompt gives the same
    text in a batch as alone.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    params = params or SamplingParams()
    ids = [validate_request(model.tokenizer, p, max_new_tokens, limit) for p in prompts]
    batch = Batch(model, slots=len(ids))
    batch.add([Sequence(p, max_new_tokens, params, seed, list(stop or []), tag=i) for i, p in enumerate(ids)])
    while len(batch):
        yield from batch.emit()  # the text goes out before the next forward pass
        batch.advance()
