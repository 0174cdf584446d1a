"""Choosing the next token from logits, shared by the PyTorch reference and the ONNX runtime.

Imports no torch: both paths hand this module a numpy row of logits, so the same seed gives the
same tokens whichever engine computed them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Below this temperature, sampling is taken as greedy: dividing logits by a tiny or subnormal
# number overflows to inf, and inf - inf turns the whole distribution into NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to turn logits into a token. greedy=True or a temperature below 1e-5 takes the argmax."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches top_p
    greedy: bool = False
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)} must be from -2 to 2, as in OpenAI's API")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1, or unset")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def penalize(logits: np.ndarray, counts: np.ndarray, params: SamplingParams) -> np.ndarray:
    """OpenAI's presence and frequency penalties: logit[j] - counts[j] * frequency_penalty - (counts[j] > 0) *
    presence_penalty, where counts[j] is how often token j was generated so far (the prompt does not count).
    Applied before temperature, top-k and top-p. (V,) -> (V,)"""
    return logits - counts * params.frequency_penalty - (counts > 0) * params.presence_penalty


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities over the last axis, in float64: (..., V) -> (..., V)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p: the distribution a token is drawn from, in float64. (V,) -> (V,)

    The exponentials are taken in float32, where numpy's exp is vectorized, and in place: a server
    pays this for every sequence at every step, and over GPT-2's 50,257 logits float64's exp took
    1.0 ms, and each new temporary array its page faults (0.5 ms more here); a sample now takes 0.44. Each
    probability is good to float32's 6e-8, relative, and is normalized and summed in float64."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(params.temperature)  # a new array, worked in place
    if params.top_k is not None and params.top_k < z.shape[-1]:
        z[z < np.partition(z, -params.top_k)[-params.top_k]] = -np.inf
    z -= z.max()
    p = np.exp(z, out=z).astype(np.float64)
    p /= p.sum()
    if params.top_p is not None and params.top_p < 1:
        order, cumulative = most_likely_until(p, params.top_p - 1e-6)
        # keep every token up to and including the one whose cumulative probability reaches top_p
        # (a hair of tolerance, above the probabilities' float32 rounding, so 0.5 + 0.3 "reaches" 0.8)
        cut = int(np.searchsorted(cumulative, params.top_p - 1e-6)) + 1
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p[~keep] = 0.0
        p /= p.sum()
    return p


def most_likely_until(p: np.ndarray, mass: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids by falling probability (ties by id, as a stable sort orders them) and their cumulative
    probabilities, far enough to hold `mass`. Sorting all of GPT-2's 50,257 took 6 ms a token; the most
    likely 1,024 (8 times more while they hold too little) are found by a partition and sorted alone."""
    k = min(len(p), 1024)
    while True:
        if k < len(p):
            candidates = np.sort(np.argpartition(-p, k - 1)[:k])
            order = candidates[np.argsort(-p[candidates], kind="stable")]
        else:
            order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        if cumulative[-1] >= mass or k == len(p):
            return order, cumulative
        k = min(len(p), 8 * k)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a (V,) row of logits."""
    if params.is_greedy:
        return int(logits.argmax())  # the method: np.argmax's Python wrapper costs more than the search
    p = probabilities(logits, params)
    cumulative = np.cumsum(p, out=p)  # in place, as above
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(p) - 1))


def refill_context(tokens: list[int], block_size: int) -> list[int]:
    """The context-window policy for generating past `block_size`.

    A model with learned positions can attend over at most `block_size` tokens. When the cache is
    full and one more token must go in, keep the last half of the window (the new token included)
    and prefill it again at positions 0..len-1. Prefilling happens once every block_size/2 tokens,
    so the amortised cost stays low, and the model always sees at least half a window of context.
    """
    keep = max(1, block_size // 2)
    return tokens[-keep:]
