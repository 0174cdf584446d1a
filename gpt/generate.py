"""Text generation with the PyTorch model and its KV cache: the reference the ONNX runtime matches.

Prefill the prompt once, then feed one token per step against the cache. Past `block_size`, the
window is refilled with its last half (`gpt.sampling.refill_context`), the same policy as serve/.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import numpy as np
import torch

from gpt.model import GPT
from gpt.sampling import SamplingParams, refill_context, sample
from gpt.tokenizer import stop_ids


@torch.inference_mode()
def generate(
    model: GPT, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None, seed: int = 0,
    stop: Collection[int] = (),
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `prompt` (a non-empty list of ids), ending
    early after a token of `stop` (gpt.tokenizer.stop_ids: the end of a document or of a chat turn), as
    serving does. Turn the ids into
    text with `tokenizer.stream()`, which hands out only complete characters."""
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    params = params or SamplingParams()
    rng = np.random.default_rng(seed)
    block = model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        context = list(prompt[-block:])
        out = model(torch.tensor([context], device=device), use_cache=True)
        for i in range(max_new_tokens):
            token = sample(out.logits[0, -1].float().cpu().numpy(), params, rng)
            yield token
            if i == max_new_tokens - 1 or token in stop:
                break
            context.append(token)
            if len(context) > block:  # the cache is full: keep the last half and prefill it again
                context = refill_context(context, block)
                out = model(torch.tensor([context], device=device), use_cache=True)
            else:
                out = model(torch.tensor([[token]], device=device), past=out.present)
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_uncached(
    model: GPT, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None, seed: int = 0,
) -> Iterator[int]:
    """The tutorial's way: recompute the whole window every step. Slow; kept to check the cache."""
    params = params or SamplingParams()
    rng = np.random.default_rng(seed)
    block = model.config.block_size
    device = next(model.parameters()).device
    context = list(prompt[-block:])
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([context], device=device)).logits
        token = sample(logits[0, -1].float().cpu().numpy(), params, rng)
        yield token
        context.append(token)
        if len(context) > block:
            context = refill_context(context, block)


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams | None = None,
                  seed: int = 0) -> Iterator[str]:
    """Continue `prompt`, yielding text as it is generated, a whole character at a time: a byte-level
    token can end inside a UTF-8 character, and the tokenizer's stream decoder holds such bytes back."""
    decoder = tokenizer.stream()
    stops = stop_ids(tokenizer)
    for token in generate(model, tokenizer.encode(prompt), max_new_tokens, params, seed, stop=stops):
        if token not in stops:
            if piece := decoder.feed(token):
                yield piece
    if tail := decoder.flush():
        yield tail
