"""How likely a model finds a text: the log-probability of each of its tokens given the ones before.

A model sees at most `block_size` tokens, so a longer text is scored in rolling windows (the usual
loglikelihood_rolling): window k reads tokens [k*stride, k*stride + block_size) and counts the
tokens it predicts that no earlier window did; the last window, when shorter, reads a whole window
that ends where the text does. With stride = block_size (the default) the windows are disjoint and
each new one starts from a single token of context, which is what lm-evaluation-harness's
`loglikelihood_rolling` does with max_length = block_size + 2 (it keeps one token for generation);
a smaller stride gives every window more context and costs more forward passes.

The server's `echo` + `logprobs` and `python -m serve.evaluate` both score through `Scorer`, so a
text gets the same figures from either. `logprob_entry` is one generated token as OpenAI's
`logprobs` reports it.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    most likely tokens at that position and their log-probabilities, best first, as arrays (a scoring
    request has tens of thousands of tokens: nothing here is a Python object per token); with
    `next_token`, the logits after the last token (read over its last block_size tokens, as
    generation would)."""

    logprobs: np.ndarray  # (n - 1,) float64
    top_ids: np.ndarray | None = None  # (n - 1, top) int64, when top > 0
    top_logprobs: np.ndarray | None = None  # (n - 1, top) float64
    next_logits: np.ndarray | None = None  # (V,)

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    def keep_top(self, k: int) -> None:
        """Keep the `k` most likely tokens at each position (a request that asked for fewer than others)."""
        if self.top_ids is not None:
            self.top_ids, self.top_logprobs = self.top_ids[:, :k], self.top_logprobs[:, :k]


class Scorer:
    """Rolling-window scoring with one model: windows of the same length, from any of the texts scored
    together, run `batch` at a time."""

    def __init__(self, model: OnnxModel, batch: int | None = None):
        """`batch`: windows per call; default as many as 256 MiB of logits hold, from 1 to 32 (a small
        model's windows batched 16 or 32 at a time scored in 0.76x the time of 8, the CPU config's
        portable graph; GPT-2's 1024 x 50,257 logits take 206 MB a window)."""
        per_window = model.block_size * model.vocab_size * 4
        self.model, self.batch = model, batch or max(1, min(32, (256 << 20) // per_window))
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
            first = max(0, end - T)  # a short last window still reads a whole window of context
            out.append((first, end, scored - first))
            scored = end
            start += stride
        return out

    def score(self, ids: list[int], stride: int | None = None, top: int = 0) -> TokenScores:
        """The log-probability of every token of `ids` after the first."""
        return self.score_many([ids], stride, top)[0]

    def score_many(self, texts: list[list[int]], stride: int | None = None, top: int = 0,
                   next_token: list[bool] | None = None) -> list[TokenScores]:
        """score() of each text, their windows batched together; `next_token[i]` also reads the logits
        that follow text i."""
        T = self.model.block_size
        texts = [np.asarray(ids, dtype=np.int64) for ids in texts]
        k, sizes = min(top, self.model.vocab_size), [max(len(ids) - 1, 0) for ids in texts]
        results = [TokenScores(np.zeros(n), *((np.zeros((n, k), np.int64), np.zeros((n, k))) if top else ()))
                   for n in sizes]
        jobs = [(i, s, e, first) for i, ids in enumerate(texts) for s, e, first in self.windows(len(ids), stride)]
        jobs += [(i, max(0, len(ids) - T), len(ids), None) for i, ids in enumerate(texts)
                 if next_token and next_token[i]]  # first None: the window's last logits are the next token's
        by_length: dict[int, list] = {}
        for job in jobs:
            by_length.setdefault(job[2] - job[1], []).append(job)
        for group in (g[k:k + self.batch] for g in by_length.values() for k in range(0, len(g), self.batch)):
            logits = self.logits(np.stack([texts[i][s:e] for i, s, e, _ in group]))
            for row, (i, s, e, first) in zip(logits, group):
                if first is None:
                    results[i].next_logits = row[-1]
                else:
                    self._fill(results[i], texts[i], row, s, e, first, top)
        return results

    @staticmethod
    def _fill(result: TokenScores, ids: np.ndarray, row: np.ndarray, s: int, e: int, first: int, top: int) -> None:
        """One window's log-probabilities (and top tokens) into its text's scores."""
        lp = log_softmax(row[first:])  # predicts ids[s + first + 1 : e + 1]
        targets = ids[s + first + 1:e + 1]
        result.logprobs[s + first:e] = lp[np.arange(len(targets)), targets]
        if top:
            k = min(top, lp.shape[1])
            if k == 1:  # an evaluation client's logprobs=1: the most likely token, no partition or sort
                best = lp.argmax(axis=1)[:, None]
                values = np.take_along_axis(lp, best, axis=1)
            else:
                best = np.argpartition(-lp, k - 1, axis=1)[:, :k]
                values = np.take_along_axis(lp, best, axis=1)
                order = np.argsort(-values, axis=1, kind="stable")
                best, values = np.take_along_axis(best, order, axis=1), np.take_along_axis(values, order, axis=1)
            result.top_ids[s + first:e], result.top_logprobs[s + first:e] = best, values

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
    and the end-of-text token by its name. Kept on the tokenizer: a response names each token often."""
    texts = vars(tokenizer).setdefault("_token_texts", {})
    text = texts.get(token)
    if text is None:
        text = texts[token] = EOT if token == tokenizer.eot_id else tokenizer.decode([token])
    return text


@dataclass
class TokenTable:
    """Every token of a vocabulary as `logprobs` names it and as it reads in a text, in arrays that a
    whole prompt indexes at once. `whole[t]`: the token's bytes are whole characters, so in a text of
    such tokens each reads as its own `piece` (a stream decoder gives the same)."""

    names: np.ndarray  # (V,) object: token_text
    pieces: np.ndarray  # (V,) object: the token's text on its own
    lengths: np.ndarray  # (V,) int64: len(pieces)
    whole: np.ndarray  # (V,) bool


def token_table(tokenizer: Tokenizer) -> TokenTable:
    """The tokenizer's TokenTable, made on first use and kept on it."""
    table = vars(tokenizer).get("_token_table")
    if table is None:
        def whole_text(b: bytes) -> str | None:
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: only a stream decoder can place it
                return None

        decoded = [whole_text(b) for b in tokenizer.token_bytes()]
        V = len(decoded)
        names = np.empty(V, dtype=object)
        names[:] = [token_text(tokenizer, t) for t in range(V)]
        pieces = np.empty(V, dtype=object)
        pieces[:] = [d or "" for d in decoded]
        lengths = np.array([len(d or "") for d in decoded], np.int64)
        table = vars(tokenizer)["_token_table"] = TokenTable(names, pieces, lengths,
                                                              np.array([d is not None for d in decoded]))
    return table


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
