"""Prefix reuse: the keys and values of prompt tokens already computed, kept on the host in blocks,
so that a prompt starting the same way (a shared system prompt, a few-shot header, the conversation
so far in a chat) copies them into its slot and prefills only the rest.

A prompt is cut into blocks of `block` tokens. Block i is keyed by a digest of every token up to its
end (a chain: the previous block's digest and its own tokens), as vLLM keys its automatic prefix
cache, so a block matches only after the same whole prefix. An entry holds one block's keys and
values for every layer, (2 * layers, heads, block, head_dim). Entries are bounded in bytes and
evicted least recently used; a lookup or a store touches a chain's deepest block first and its first
block last, so eviction takes chains from their ends and never strands a block behind a missing one
for long.

Weight-only quantized graphs (int4, int8 weights) reuse as fp32 does: their kernels quantize each
row's activations alone. Dynamic int8, which scales a whole call's activations at once, does not.

At least one token of a prompt is always prefilled (its logits choose the next token), so a prompt
reuses at most its whole blocks before its last token. What is reused is an exact copy of what the
model computed for the same tokens at the same positions; the rest is prefilled after it as a chunk
after a past, the case the export's parity grid checks (serve/batch.py's `SlotBatch._prefill`).

Imports no torch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

BLOCK = 32  # tokens per entry: llama.cpp reuses any prefix, vLLM blocks of 16; 32 keeps lookups short


class PrefixCache:
    """Blocks of cached keys and values by prefix, at most `max_bytes` of them, least recently used out."""

    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()  # oldest first
        self.bytes = 0
        self.lookups = self.hits = self.tokens_reused = self.evictions = 0

    @classmethod
    def for_model(cls, model, max_bytes: int) -> PrefixCache | None:
        """A prefix cache for a shared-cache model's slots, None where it has none: a bound of 0, a
        device other than the CPU (there the slots are numpy arrays), or dynamic int8, whose activations
        are quantized by a scale over the whole call, so a prompt's keys and values depend on what ran
        beside them. A short context reuses shorter blocks: an eighth of it, at most BLOCK."""
        if max_bytes <= 0 or model.device != "cpu" or model.variant.endswith("int8"):
            return None
        return cls(max_bytes, max(1, min(BLOCK, model.block_size // 8)))

    def keys(self, ids: list[int], blocks: int) -> list[bytes]:
        """The digests of the first `blocks` blocks of `ids`, each of every token up to its end."""
        keys, digest = [], b""
        for i in range(blocks):
            chunk = np.asarray(ids[i * self.block:(i + 1) * self.block], np.int64).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            keys.append(digest)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block ends most recent: evicted last
            self.entries.move_to_end(key)

    def restore(self, ids: list[int], arrays: list[np.ndarray], slot: int) -> int:
        """Copy the longest cached prefix of `ids` (whole blocks, leaving at least one token) into `slot`
        of the cache buffers `arrays` (2 * layers of (slots, heads, length, head_dim)); the tokens copied."""
        self.lookups += 1
        matched = []
        for key in self.keys(ids, (len(ids) - 1) // self.block):
            if key not in self.entries:
                break
            matched.append(key)
        if not matched:
            return 0
        self._touch(matched)
        for i, key in enumerate(matched):
            entry, start = self.entries[key], i * self.block
            for j, a in enumerate(arrays):
                a[slot, :, start:start + self.block] = entry[j]
        n = len(matched) * self.block
        self.hits += 1
        self.tokens_reused += n
        return n

    def store(self, ids: list[int], arrays: list[np.ndarray], slot: int) -> None:
        """Keep the whole blocks of `ids`, which `slot` of `arrays` now caches, that are not kept yet;
        then evict the least recently used blocks past the bound."""
        keys = self.keys(ids, len(ids) // self.block)
        for i, key in enumerate(keys):
            if key not in self.entries:
                start = i * self.block
                entry = np.stack([a[slot, :, start:start + self.block] for a in arrays])
                if entry.nbytes > self.max_bytes:
                    return  # a bound smaller than one block keeps nothing
                self.entries[key] = entry
                self.bytes += entry.nbytes
        self._touch(keys)
        while self.bytes > self.max_bytes:
            _, entry = self.entries.popitem(last=False)
            self.bytes -= entry.nbytes
            self.evictions += 1
