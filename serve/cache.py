"""The preallocated KV cache of a shared-cache (fused) graph.

`CacheBuffers` holds 2 * num_layers buffers of (slots, heads, block_size, head_dim) on the model's
device, allocated once. Slot s of every buffer holds one sequence's keys or values. A `CacheView`
is a range of slots, bound by address as both past and present, so the graph's attention op
writes each new key and value in place: nothing is copied between steps.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from serve.runtime import OnnxModel


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

    def binding(self) -> Any:
        """An IOBinding with these slots bound as past and present, made once per view and reused: a
        decode step binds only its three small inputs and the logits."""
        key = (self.start, self.count)
        binding = self.buffers.bindings.get(key)
        if binding is None:
            model = self.buffers.model
            binding = model.session.io_binding()
            shape = [self.count, model.num_heads, self.buffers.length, model.head_dim]
            for name_in, name_out, pointer in zip(model.input_names[3:], model.output_names[1:], self.pointers()):
                binding.bind_input(name_in, model.device, 0, model.cache_dtype, shape, pointer)
                binding.bind_output(name_out, model.device, 0, model.cache_dtype, shape, pointer)
            self.buffers.bindings[key] = binding
        return binding

    def host(self) -> list[np.ndarray]:
        return [a[self.start:self.start + self.count] for a in self.buffers.host()]

