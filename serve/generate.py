"""Generation as a caller sees it: prompts in, text out, token by token, through a batch.

    generate(model, prompts, max_new_tokens, params)   an Event per step: the new text of each sequence
    warmup(model)                                      every code path once, before the first request
    validate_request(tokenizer, prompt, ...)           a prompt's token ids, or a one-line error (the
                                                       server's requests and `python -m serve` use it too)

`python -m serve`, the server's tests, the export's greedy gate and the benchmarks use it. It sits at
the end of the room's imports: cache and manifest <- runtime (OnnxModel) <- scoring <- batch <- here.

Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpt.sampling import SamplingParams
from gpt.tokenizer import Tokenizer
from serve.batch import Event, Sequence, make_batch
from serve.runtime import OnnxModel


def validate_request(tokenizer: Tokenizer, prompt: str | list[int], max_new_tokens: int, limit: int,
                     max_prompt_tokens: int = 1 << 16, allow_zero: bool = False) -> list[int]:
    """Token ids of a prompt (text, or token ids as OpenAI's API takes them), or a one-line ValueError
    naming what is wrong. Limits count tokens; `allow_zero` lets max_new_tokens be 0 (echo scoring)."""
    if isinstance(prompt, list):
        vocab = tokenizer.vocab_size
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"a prompt of token ids must be a non-empty list of integers from 0 to {vocab - 1}")
        ids = list(prompt)
    elif not isinstance(prompt, str) or prompt == "":
        raise ValueError("prompt is empty: give at least one character, e.g. 'ROMEO:'")
    low = 0 if allow_zero else 1
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not low <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer from {low} to {limit}")
    if not isinstance(prompt, list):
        ids = tokenizer.encode(prompt)
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens}: send a shorter one "
                         "(the model sees at most its block_size of them anyway)")
    return ids


def generate(model: OnnxModel, prompts: list[str] | str, max_new_tokens: int, params: SamplingParams | None = None,
             seed: int = 0, stop: list[str] | None = None, limit: int = 100_000) -> Iterator[Event]:
    """Continue one prompt or a batch of prompts, yielding text as it is generated.

    Every prompt draws from its own random stream seeded with `seed`, so a prompt gives the same
    text in a batch as alone.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    params = params or SamplingParams()
    ids = [validate_request(model.tokenizer, p, max_new_tokens, limit) for p in prompts]
    batch = make_batch(model, slots=len(ids))
    batch.add([Sequence(p, max_new_tokens, params, seed, list(stop or []), tag=i) for i, p in enumerate(ids)])
    while len(batch):
        yield from batch.emit()  # the text goes out before the next forward pass
        batch.advance()


def warmup(model: OnnxModel) -> None:
    """A short batched generation through every code path (prefill, splice, decode, sampling), so the
    first real request does not pay for initialisation."""
    batch = make_batch(model, slots=2)
    batch.add([Sequence([0, 0], 3, SamplingParams(temperature=1.0)), Sequence([0], 3, SamplingParams(greedy=True))])
    while len(batch):
        batch.step()
