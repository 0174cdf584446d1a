"""How likely a model finds a text: the log-probability of each of its tokens given the ones before.

A model sees at most `block_size` tokens, so a longer text is scored in rolling windows (the usual
loglikelihood_rolling): window k reads tokens [k*stride, k*stride + block_size) and counts the
tokens it predicts that no earlier window did. With stride = block_size (the default) the windows
are disjoint and each new one starts from a single token of context, which is what
lm-evaluation-harness's `loglikelihood_rolling` does with max_length = block_size + 1; a smaller
stride gives every window more context and costs more forward passes.

The server's `echo` + `logprobs` and `python -m serve.evaluate` both score through `Scorer`, so a
text gets the same figures from either. `logprob_entry` is one generated token as OpenAI's
`logprobs` reports it.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpt.sampling import log_softmax
from gpt.tokenizer import EOT, Tokenizer
from serve.cache import CacheBuffers

if TYPE_CHECKING:
    from serve.runtime import OnnxModel


@dataclass
class TokenScores:
    """Scores of ids[1:] (the first token has no context): its log-probability, and with `top` > 0 the
    most likely tokens at that position as (id, log-probability), best first."""

    logprobs: np.ndarray  # (n - 1,) float64
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


class Scorer:
    """Rolling-window scoring with one model, full windows batched `batch` at a time."""

    def __init__(self, model: OnnxModel, batch: int = 8):
        self.model, self.batch = model, batch
        self._buffers: CacheBuffers | None = None  # a shared-cache graph's scratch slots, made on first use

    def windows(self, n: int, stride: int | None = None) -> list[tuple[int, int, int]]:
        """(start, end, first): window tokens [start, end), counting the targets from position `first`
        of the window on (targets are ids[start + 1 : end + 1], limited to the text)."""
        T = self.model.block_size
        stride = T if stride is None else stride
        if not 1 <= stride <= T:
            raise ValueError(f"stride={stride} must be from 1 to block_size={T}")
        out, scored, start = [], 0, 0  # scored: targets ids[1 .. scored] are done
        while scored < n - 1:
            end = min(start + T, n - 1)
            out.append((start, end, scored - start))
            scored = end
            start += stride
        return out

    def score(self, ids: list[int], stride: int | None = None, top: int = 0) -> TokenScores:
        """The log-probability of every token of `ids` after the first."""
        ids = np.asarray(ids, dtype=np.int64)
        logprobs = np.zeros(max(len(ids) - 1, 0))
        tops: list[list[tuple[int, float]]] = [[] for _ in range(len(logprobs))] if top else []
        plan = self.windows(len(ids), stride)
        full = [w for w in plan if w[1] - w[0] == self.model.block_size]
        groups = [full[i:i + self.batch] for i in range(0, len(full), self.batch)]
        groups += [[w] for w in plan if w[1] - w[0] != self.model.block_size]
        for group in groups:
            logits = self.logits(np.stack([ids[s:e] for s, e, _ in group]))
            for row, (s, e, first) in zip(logits, group):
                lp = log_softmax(row[first:])  # predicts ids[s + first + 1 : e + 1]
                targets = ids[s + first + 1:e + 1]
                logprobs[s + first:e] = lp[np.arange(len(targets)), targets]
                for j in range(top and len(targets)):
                    best = np.argpartition(-lp[j], min(top, lp.shape[1] - 1))[:top]
                    best = best[np.argsort(-lp[j][best], kind="stable")]
                    tops[s + first + j] = [(int(t), float(lp[j][t])) for t in best]
        return TokenScores(logprobs, tops)

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of B windows of T tokens, each read from position 0 with no past."""
        B, T = windows.shape
        mask, positions = np.ones((B, T), np.int64), np.broadcast_to(np.arange(T), (B, T))
        if self.model.shared_cache:
            if self._buffers is None or self._buffers.slots < B:
                self._buffers = CacheBuffers(self.model, max(B, self.batch))
            cache = self._buffers.view(0, B)
        else:
            cache = self.model.empty_cache(B)
        logits, _ = self.model.run(windows, mask, positions, cache)
        return logits


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """How a token shows in `logprobs`: its text (a byte that is part of a character shows as U+FFFD),
    and the end-of-text token by its name."""
    return EOT if token == tokenizer.eot_id else tokenizer.decode([token])


@dataclass
class TokenLogprob:
    """One token of a completion as OpenAI's `logprobs` reports it, from the model's own distribution
    (before penalties, temperature, top-k and top-p)."""

    token: str
    logprob: float | None  # None for a prompt's first token, which has no context
    top: dict[str, float] | None  # the most likely tokens at that position, and the chosen one
    offset: int  # where the token's text starts in the completion's text


def logprob_entry(tokenizer: Tokenizer, logits: np.ndarray, token: int, top: int, offset: int) -> TokenLogprob:
    """The entry for `token` chosen from a (V,) row of raw logits, with the `top` most likely alternatives."""
    lp = log_softmax(logits)
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    alternatives = {token_text(tokenizer, int(t)): float(lp[t]) for t in best}
    alternatives.setdefault(token_text(tokenizer, token), float(lp[token]))
    return TokenLogprob(token_text(tokenizer, token), float(lp[token]), alternatives, offset)
