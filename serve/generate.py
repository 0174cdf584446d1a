"""Generation as a caller sees it: prompts in, text out, token by token, through a batch.

    generate(model, prompts, max_new_tokens, params)   an Event per step: the new text of each sequence
    warmup(model)                                      every code path once, before the first request

`python -m serve`, the server's tests, the export's greedy gate and the benchmarks use it. It sits at
the end of the room's imports: cache and manifest <- runtime (OnnxModel) <- scoring <- batch <- here.

Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpt.sampling import SamplingParams
from serve.batch import Event, Sequence, make_batch, validate_request
from serve.runtime import OnnxModel


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
