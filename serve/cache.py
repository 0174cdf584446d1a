"""The preallocated KV cache of a shared-cache (fused) graph.

`CacheBuffers` holds 2 * num_layers buffers of (slots, heads, block_size, head_dim) on the model's
device, allocated once. Slot s of every buffer holds one sequence's keys or values. A `CacheView`
is a range of slots, bound by address as both past and present, so the graph's attention op
writes each new key and value in place: nothing is copied between steps. A `StepBinding` is one
decode step over a view, bound once: its token ids, positions and logits are arrays written in
place, so a step costs onnxruntime's run and little Python around it.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class OnnxModel(Protocol):
    """What the cache reads of its model (serve.runtime.OnnxModel, which imports this module: the
    imports run one way, so the cache names the parts it uses rather than the class)."""

    session: Any  # the onnxruntime InferenceSession
    device: str
    block_size: int
    num_layers: int
    num_heads: int  # the cache's heads: a llama's key/value heads
    head_dim: int
    vocab_size: int
    cache_dtype: np.dtype
    input_names: list[str]
    output_names: list[str]

# Devices where a decode step binds the attention mask once at the cache's full width (see StepBinding)
FIXED_MASK_DEVICES = {"cpu"}


class CacheBuffers:
    """The preallocated cache of a shared-cache graph: 2 * num_layers buffers of (slots, H, block_size, D)
    on the model's device. Slot s of every buffer holds one sequence's keys or values."""

    def __init__(self, model: OnnxModel, slots: int, host: list[np.ndarray] | None = None, length: int | None = None):
        """`length`: positions per slot, block_size unless told (the export's checks use short buffers)."""
        self.model, self.slots, self.length = model, slots, length or model.block_size
        shape = (slots, model.num_heads, self.length, model.head_dim)
        arrays = [np.zeros(shape, model.cache_dtype) for _ in range(2 * model.num_layers)]
        for a, h in zip(arrays, host or []):
            a[:, :, :h.shape[2]] = h
        if model.device == "cpu":  # numpy memory, bound by address: the graph writes into these arrays
            self.arrays, self._pointers = arrays, [a.ctypes.data for a in arrays]
        else:
            import onnxruntime

            self.values = [onnxruntime.OrtValue.ortvalue_from_numpy(a, model.device, 0) for a in arrays]
            self._pointers = [v.data_ptr() for v in self.values]
        self.slot_bytes = model.num_heads * self.length * model.head_dim * model.cache_dtype.itemsize  # a slot
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
                                                     for a in self.host()], length=self.length)


@dataclass
class CacheView:
    """Slots [start, start + count) of CacheBuffers: what one call binds as past and present."""

    buffers: CacheBuffers
    start: int
    count: int

    def pointers(self) -> list[int]:
        offset = self.start * self.buffers.slot_bytes
        return [p + offset for p in self.buffers._pointers]

    def binding(self, reuse: bool = True) -> Any:
        """An IOBinding with these slots bound as past and present, made once per view and reused (a
        call binds only its three small inputs and the logits); `reuse=False`: a new one of its own."""
        key = (self.start, self.count)
        binding = self.buffers.bindings.get(key) if reuse else None
        if binding is None:
            model = self.buffers.model
            binding = model.session.io_binding()
            shape = [self.count, model.num_heads, self.buffers.length, model.head_dim]
            for name_in, name_out, pointer in zip(model.input_names[3:], model.output_names[1:], self.pointers()):
                binding.bind_input(name_in, model.device, 0, model.cache_dtype, shape, pointer)
                binding.bind_output(name_out, model.device, 0, model.cache_dtype, shape, pointer)
            if reuse:
                self.buffers.bindings[key] = binding
        return binding

    def host(self) -> list[np.ndarray]:
        return [a[self.start:self.start + self.count] for a in self.buffers.host()]


class StepBinding:
    """One decode step of slots [0, n), every input and output bound once by address.

    The caller writes each row's token id and position in place (`set_row`) and reads `logits`
    (n, 1, V) in place; `run` takes each row's length and marks it in the attention mask. On CPU
    the mask is (n, buffer length), bound once and updated in place: GroupQueryAttention on a
    shared cache reads each row's length from the mask's sum and takes the mask's width as no more
    than a bound (measured: the same outputs and time at any width). So a step binds nothing and
    allocates nothing, and the Python between two runs stays short: after a run has streamed the
    weights through the caches, every numpy call and every binding costs tens of microseconds. On
    CUDA, where the fixed width has not been measured, the mask is bound at its exact width each
    step. This is the decode loop's fast path; the general `OnnxModel.run` binds whatever it is
    given."""

    def __init__(self, view: CacheView):
        model = view.buffers.model
        self.count, self.session = view.count, model.session
        self.binding = view.binding(reuse=False)  # its own: a prefill rebinds the shared ones' inputs
        n, self.width = view.count, view.buffers.length
        self.ids, self.positions = np.zeros((n, 1), np.int64), np.zeros((n, 1), np.int64)
        self.logits = np.empty((n, 1, model.vocab_size), np.float32)
        self.mask = np.zeros((n, self.width), np.int64)
        # Flat views of the same memory: an item written through one is a short C call, not numpy's
        self._ids, self._positions, self._mask = (memoryview(a).cast("B").cast("q")
                                                  for a in (self.ids, self.positions, self.mask))
        self.marked = [0] * n  # each mask row's ones, from the left
        self.fixed = model.device in FIXED_MASK_DEVICES
        for name, array in (("input_ids", self.ids), ("position_ids", self.positions)):
            self.binding.bind_input(name, "cpu", 0, np.int64, list(array.shape), array.ctypes.data)
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        if self.fixed:
            self.binding.bind_input("attention_mask", "cpu", 0, np.int64, [n, self.width], self.mask.ctypes.data)

    def set_row(self, row: int, token: int, position: int) -> None:
        self._ids[row], self._positions[row] = token, position

    def run(self, lengths: list[int]) -> np.ndarray:
        """Run the step with `lengths[s]` tokens in slot s, the fed one included (each row set
        already); the logits (n, 1, V), overwritten by the next step."""
        for row, length in enumerate(lengths):
            marked = self.marked[row]
            if length == marked + 1:  # one more token: the usual step
                self._mask[row * self.width + marked] = 1
            elif length != marked:  # a slot refilled or freed since
                self.mask[row, :length], self.mask[row, length:] = 1, 0
            self.marked[row] = length
        if not self.fixed:
            width = max(lengths)
            self.bound = np.ascontiguousarray(self.mask[:, :width])  # alive until the next step binds another
            self.binding.bind_input("attention_mask", "cpu", 0, np.int64, [self.count, width], self.bound.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return self.logits
