"""Sequences and the batches that decode them together, one onnxruntime call per step.

The server's continuous batching is this: sequences join (`add`), leave (finished: `remove`) and
refill their window past `block_size` (the `gpt.sampling.refill_context` policy of the PyTorch
reference) between steps. Two kinds of batch, one per kind of graph, behind one base class:

- `SlotBatch`, for the fused graph (`cache: shared` in the manifest): the cache is allocated once
  (serve/cache.py), one slot of `block_size` positions per sequence, and bound as both past and
  present, so the attention op writes each new key and value in place. A sequence joins by
  prefilling alone into a free slot (after the blocks of its prompt that an earlier prompt computed,
  copied in: serve/prefix.py) and leaves by freeing it.
- `PaddedBatch`, for the portable graph (`cache: concat`): the graph returns a longer cache each
  step. Sequences are left-padded: the attention mask marks real tokens, and each sequence's
  positions count its own real tokens. Joining and leaving rebuild the cache through the host.

`make_batch(model)` chooses. Either way a sequence gets the same logits in a batch as alone.

Imports no torch.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt.sampling import SamplingParams, penalize, refill_context, sample
from gpt.tokenizer import StreamDecoder, Tokenizer, stop_ids
from serve.cache import CacheBuffers, StepBinding
from serve.prefix import PrefixCache
from serve.scoring import TokenLogprob, logprob_entry

if TYPE_CHECKING:
    from serve.runtime import OnnxModel


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
    logprobs: int | None = None  # report each token's logprob and this many alternatives (None: off)
    score_prompt: bool = False  # score the prompt's tokens too (echo with logprobs), into prompt_scores
    prompt_scores: Any = None  # serve.scoring.TokenScores of the prompt, when score_prompt
    entries: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when logprobs is set

    def __post_init__(self) -> None:
        self._rng: np.random.Generator | None = None  # made at the first sample: a scored prompt never draws
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be forming
        self.counts: np.ndarray | None = None  # how often each token was generated, for the penalties

    def choose(self, logits: np.ndarray, tokenizer: Tokenizer) -> int:
        """The next token from a (V,) row of the model's logits: penalties, then sampling; its logprob
        entry (from the raw logits) when asked for."""
        row = logits
        if self.params.penalized:
            self.counts = np.zeros(len(logits)) if self.counts is None else self.counts
            row = penalize(logits, self.counts, self.params)
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        token = sample(row, self.params, self._rng)
        if self.counts is not None:
            self.counts[token] += 1
        if self.logprobs is not None:
            self.entries.append(logprob_entry(tokenizer, logits, token, self.logprobs, len(self.text)))
        return token

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

    def step(self, logits: np.ndarray, tokenizer: Tokenizer) -> Event:
        """Choose the next token from the model's (V,) logits and take it in: its text, or the end of
        the document (a natural stop, no text); the event that hands it out."""
        token = self.choose(logits, tokenizer)
        if self.decoder is None:
            self.decoder = tokenizer.stream()
        if token in stop_ids(tokenizer):  # the end of the document, or of the assistant's turn
            self.generated.append(token)
            self.finish_reason = "stop"
        else:
            self.accept(token, self.decoder.feed(token))
        if self.finish_reason == "length":
            self.text += self.decoder.flush()  # a character cut off by the limit shows as U+FFFD
        return Event(self, self.take_text(), self.finish_reason is not None,
                     self.entries[-1] if self.logprobs is not None else None)

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
    logprob: TokenLogprob | None = None  # the step's token, when the sequence asked for logprobs


class Batch(ABC):
    """Sequences decoded together, one onnxruntime call per step: what both kinds share."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.sequences: list[Sequence] = []
        self.logits = np.zeros((0, model.vocab_size), dtype=np.float32)  # (B, V): next-token logits, in order

    def __len__(self) -> int:
        return len(self.sequences)

    @abstractmethod
    def add(self, sequences: list[Sequence]) -> None:
        """Take new sequences in; each then has its next-token logits ready."""

    @abstractmethod
    def remove(self, sequences: Iterable[Sequence]) -> None:
        """Let sequences go (finished or abandoned), freeing what they held."""

    @abstractmethod
    def advance(self) -> None:
        """Feed every sequence its sampled token: one model call for the whole batch."""

    @abstractmethod
    def cache_bytes_in_use(self) -> int:
        """Bytes of KV cache the batch's sequences hold now."""

    def warm(self) -> None:
        """Make the first requests cost what later ones do (a server calls it before it says ready)."""

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
            events.append(s.step(self.logits[i], tokenizer))
            if s.finish_reason:
                finished.append(s)
            else:
                s.context.append(s.generated[-1])
        if finished:
            self.remove(finished)
        return events


class PaddedBatch(Batch):
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
        logits, present = self.model.run(ids, mask, positions, self.model.empty_cache(B), last_only=True)
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

    def cache_bytes_in_use(self) -> int:
        B, W = self.mask.shape
        return B * W * self.model.cache_bytes(1) // self.model.block_size

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


class SlotBatch(Batch):
    """The fused graph's batch: each sequence owns a slot of a cache allocated once, which the graph
    writes in place.

    Joining prefills the sequence alone into the lowest free slot; leaving frees its slot; a refill
    past block_size prefills the shortened context into the same slot. A step runs slots [0, n), n
    one past the highest slot in use: a free slot among them decodes a dummy token at its position 0,
    which nothing reads. Rows are right-padded: row s of the mask has a 1 for each token slot s
    caches, and one for the token fed now.
    """

    def __init__(self, model: OnnxModel, slots: int, prefix: PrefixCache | None = None):
        super().__init__(model)
        self.prefix = prefix  # prompt blocks already computed, copied in rather than prefilled again
        self.buffers = CacheBuffers(model, max(1, slots))
        self.slot_of: dict[int, int] = {}  # id(sequence) -> its slot
        self.free = list(range(self.buffers.slots))  # sorted: the lowest is taken first
        self.length = [0] * self.buffers.slots  # tokens cached in each slot
        self.steps: dict[int, StepBinding] = {}  # n -> the decode step of slots [0, n), bound once

    def cache_bytes_in_use(self) -> int:
        return len(self.slot_of) * self.model.cache_bytes(1)

    def warm(self) -> None:
        """Commit the cache's memory (as llama.cpp's server clears its own at start; else each slot's first
        sequences pay its page faults) and prefill a long prompt, growing onnxruntime's arena once."""
        for a in getattr(self.buffers, "arrays", []):
            a.fill(0)
        prefix, self.prefix = self.prefix, None  # no prompt of a client's to keep
        self._prefill(0, [0] * min(self.model.block_size, 512))
        self.prefix, self.length[0] = prefix, 0

    def _take_slot(self) -> int:
        if not self.free:  # more sequences than slots: double the buffers (one copy, not per step)
            old = self.buffers.slots
            self.buffers = self.buffers.grown(2 * old)
            self.steps.clear()  # bound to the old buffers, which they would keep alive
            self.free = list(range(old, 2 * old))
            self.length += [0] * old
        return self.free.pop(0)

    def _prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        """Run `ids` alone into an empty slot, which then caches them; the last position's logits (V,).
        The longest prefix the prefix cache holds is copied in first, the rest run after it (a past)."""
        self.length[slot] = len(ids)
        if not ids:
            return np.zeros(self.model.vocab_size, np.float32)
        n, arrays = len(ids), getattr(self.buffers, "arrays", None)
        start = self.prefix.restore(ids, arrays, slot) if self.prefix else 0
        logits, _ = self.model.run(np.array([ids[start:]], np.int64), np.ones((1, n), np.int64),
                                   np.arange(start, n)[None], self.buffers.view(slot, 1), last_only=True)
        if self.prefix:
            self.prefix.store(ids, arrays, slot)
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
        for slot in (self.slot_of.pop(id(s)) for s in self.sequences if id(s) in gone):
            self.length[slot] = 0
            bisect.insort(self.free, slot)
        self.sequences = [self.sequences[i] for i in keep]
        self.logits = self.logits[keep]

    def advance(self) -> None:
        """Feed every sequence its sampled token: one model call for slots [0, n)."""
        if not self.sequences:
            return
        for s in self.sequences:  # a full window restarts from the last half of its context, as in PyTorch
            if len(s.context) > self.model.block_size:
                s.context = refill_context(s.context, self.model.block_size)
                self._prefill(self.slot_of[id(s)], s.context[:-1])
        slots = [self.slot_of[id(s)] for s in self.sequences]
        n = max(slots) + 1
        step = self.steps.get(n) or self.steps.setdefault(n, StepBinding(self.buffers.view(0, n)))
        length = self.length
        for slot in set(range(n)).difference(slots):
            step.set_row(slot, 0, 0)  # a free slot among them decodes a dummy token at its position 0
        for s, slot in zip(self.sequences, slots):
            step.set_row(slot, s.context[-1], length[slot])  # the fed token's position: the tokens before it
            length[slot] += 1
        logits = step.run([max(k, 1) for k in length[:n]])  # a free slot's row: its dummy token alone
        in_order = slots == list(range(n))  # always so at batch 1: then a view, which emit() reads first
        self.logits = logits[:, -1] if in_order else logits[slots, -1]


def make_batch(model: OnnxModel, slots: int | None = None, prefix_bytes: int = 0) -> Batch:
    """The batch for this model's graph: slots in a preallocated cache for the fused graph, a padded,
    rebuilt cache for the portable one. `slots`: how many sequences at most (a SlotBatch grows past it).
    `prefix_bytes`: the bound of the fused graph's prefix cache on the CPU (0: none; serve/prefix.py)."""
    if not model.shared_cache:
        return PaddedBatch(model)
    return SlotBatch(model, slots or 1, PrefixCache.for_model(model, prefix_bytes))
