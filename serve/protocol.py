"""OpenAI's completions API as this server speaks it: the request body to `Work` (decode_request), and
finished sequences or their events back to a `text_completion` object or server-sent events (encode_*).

Follows OpenAI's legacy completions shape, and vLLM's behaviour where OpenAI is silent:
- `logprobs: k` (0 to 5) gives every token's log-probability and the k most likely tokens at its
  position (the chosen one included), from the model's own distribution: before the penalties,
  temperature, top-k and top-p. `text_offset` is in characters of the returned text.
- `echo: true` returns the prompt before the completion, its tokens scored (the first has no context,
  so its logprob is null); `max_tokens: 0` with echo scores the prompt and generates nothing.
- A prompt is text, or token ids (a list of ints), or a list of either.
- `usage` is on every non-streaming response; a stream sends it in a last chunk with
  `stream_options: {"include_usage": true}`.

Imports no torch.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.sampling import SamplingParams
from gpt.tokenizer import Tokenizer
from serve.batch import Event, Sequence
from serve.generate import validate_request
from serve.guard import error_body
from serve.runtime import OnnxModel
from serve.scheduler import Limits
from serve.scoring import TokenLogprob, token_table

MAX_LOGPROBS = 5  # as OpenAI's completions API


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What OpenAI's completions and chat completions requests share; any field not named is an error.
    Bounds that depend on the server's limits are checked by `sampling`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as by OpenAI's server


class CompletionRequest(SamplingRequest):
    """The OpenAI completions request this server understands (decode_request checks it)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class RequestError(Exception):
    """A request the server answers with an error: the status, and the body's message and fields."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


@dataclass
class Work:
    """A decoded request: what the model loop needs, and what the answer repeats."""

    ids: list[list[int]]  # token ids of each prompt
    n: int  # completions per prompt
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    seed: int  # the n-th completion of a prompt uses seed + n
    stream: bool
    logprobs: int | None = None
    echo: bool = False
    include_usage: bool = False

    def sequences(self, tag) -> list[Sequence]:
        """One sequence per prompt and completion; `tag(index)` is each one's handle."""
        return [Sequence(ids, self.max_tokens, self.params, self.seed + j, self.stops, tag=tag(i * self.n + j),
                         logprobs=self.logprobs, score_prompt=self.echo and self.logprobs is not None)
                for i, ids in enumerate(self.ids) for j in range(self.n)]


def decode_request(body: CompletionRequest, model: OnnxModel, limits: Limits, model_id: str) -> Work:
    """Check a parsed body against this server's model and limits; turn its prompts into token ids."""
    check_model(body, model_id)
    if body.max_tokens > limits.max_new_tokens:
        raise RequestError(400, f"max_tokens: must be at most {limits.max_new_tokens}", "max_tokens")
    if body.max_tokens == 0 and not body.echo:
        raise RequestError(400, "max_tokens=0 asks for no completion: use it with echo=true to score the prompt",
                           "max_tokens")
    prompts = prompt_list(body.prompt)
    if not prompts or len(prompts) > limits.max_prompts:
        raise RequestError(400, f"prompt must be text, token ids, or a list of 1 to {limits.max_prompts} of them",
                           "prompt")
    stops, params, seed, include_usage = sampling(body, limits, len(prompts))
    try:
        ids = [validate_request(model.tokenizer, p, body.max_tokens, limits.max_new_tokens, limits.max_prompt_tokens,
                                allow_zero=True) for p in prompts]
    except ValueError as e:
        raise RequestError(400, str(e), "prompt") from None
    return Work(ids, body.n, body.max_tokens, params, stops, seed, body.stream, body.logprobs, body.echo, include_usage)


def check_model(body, model_id: str) -> None:
    if body.model not in (None, model_id):
        raise RequestError(404, f"model {body.model!r} is not served here; this server serves {model_id!r}",
                           "model", code="model_not_found")


def sampling(body: SamplingRequest, limits: Limits,
             prompts: int) -> tuple[list[str], SamplingParams, int, bool]:
    """What completions and chat requests share: n, stop strings, sampling settings, the seed and
    include_usage, each checked against the limits."""
    if body.n > limits.max_n:
        raise RequestError(400, f"n: must be at most {limits.max_n}", "n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError(400, "stop must be up to 4 non-empty strings", "stop")
    if prompts * body.n > limits.max_queue:  # would never fit, however long the client waited
        raise RequestError(400, f"{prompts} prompt(s) x n={body.n} is {prompts * body.n} sequences, over "
                           f"this server's limit of {limits.max_queue}: send fewer prompts or a smaller n", "n")
    try:
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k,
                                top_p=None if body.top_p == 1.0 else body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return stops, params, seed, include_usage


def prompt_list(prompt) -> list:
    """The prompts of a request: one text, one list of token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    return list(prompt)


# --- encoding: finished sequences and events to OpenAI's objects -----------------------------------

def response_head(model_id: str) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}


def usage(work: Work, sequences: list[Sequence]) -> dict:
    prompt_tokens = sum(len(p) for p in work.ids)
    completion_tokens = sum(len(s.generated) for s in sequences)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def prompt_logprobs(tokenizer: Tokenizer, s: Sequence) -> tuple[str, dict]:
    """The prompt's text as echo returns it, and its tokens' `logprobs` lists (the first token has no
    logprob): built from the vocabulary's arrays (serve.scoring.TokenTable) a list at a time, as a
    scoring request has tens of thousands of tokens; a prompt with a token that is part of a character
    reads its text through a stream decoder, token by token."""
    ids, table = np.asarray(s.prompt_ids, np.int64), token_table(tokenizer)
    if table.whole[ids].all():  # every token whole characters: each reads as its own text
        lengths = table.lengths[ids]
        text, offsets = "".join(table.pieces[ids].tolist()), (np.cumsum(lengths) - lengths).tolist()
    else:
        decoder = tokenizer.stream()
        pieces = [decoder.feed(t) for t in s.prompt_ids]  # each token's text as it completes characters
        text, offsets = "".join(pieces) + decoder.flush(), [0, *accumulate(map(len, pieces))][:-1]
    names = table.names[ids].tolist()
    scores = s.prompt_scores
    if scores is None:
        logprobs, tops = [None] * len(ids), [None] * len(ids)
    else:
        logprobs = [None, *scores.logprobs.tolist()]
        k = scores.top_ids.shape[1] if scores.top_ids is not None else 0
        if k == 1:  # an evaluation client's logprobs=1: the best token, and the chosen one when another
            tops = [None] + [{a: x} if a == b else {a: x, b: y} for a, x, b, y in
                             zip(table.names[scores.top_ids[:, 0]].tolist(), scores.top_logprobs[:, 0].tolist(),
                                 names[1:], logprobs[1:])]
        elif k:
            top_names, top_values = table.names[scores.top_ids].tolist(), scores.top_logprobs.tolist()
            tops = [None, *map(dict, map(zip, top_names, top_values))]
            for top, name, logprob in zip(tops[1:], names[1:], logprobs[1:]):
                top.setdefault(name, logprob)  # the chosen token is always among them
        else:
            tops = [None] + [{name: logprob} for name, logprob in zip(names[1:], logprobs[1:])]
    return text, {"tokens": names, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def logprobs_object(entries: list[TokenLogprob], shift: int = 0) -> dict:
    """OpenAI's `logprobs` for a choice: four parallel lists."""
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": [e.offset + shift for e in entries]}


def encode_choice(tokenizer: Tokenizer, s: Sequence, work: Work) -> dict:
    """One whole choice: its text (after the prompt, with echo), logprobs and finish reason."""
    prompt_text, prompt = prompt_logprobs(tokenizer, s) if work.echo else ("", None)
    logprobs = None
    if work.logprobs is not None:
        logprobs = logprobs_object(s.entries, shift=len(prompt_text))
        if prompt is not None:
            logprobs = {key: prompt[key] + values for key, values in logprobs.items()}
    return {"text": prompt_text + s.text, "index": s.tag.index, "logprobs": logprobs,
            "finish_reason": s.finish_reason}


def encode_response(head: dict, tokenizer: Tokenizer, sequences: list[Sequence], work: Work) -> dict:
    """The whole completion, once every sequence has finished."""
    choices = [encode_choice(tokenizer, s, work) for s in sequences]
    return {**head, "choices": choices, "usage": usage(work, sequences)}


def encode_chunk(head: dict, event: Event, work: Work, prompt: tuple[str, dict | None], shift: int) -> str:
    """One server-sent event: a piece of one choice's text, with `prompt` (its text and logprobs: the
    echo, in a choice's first chunk) before it, and the step's token in `logprobs` when asked for;
    `shift` is the echoed prompt's length, which the completion's text offsets start after."""
    s = event.sequence
    logprobs = None
    if work.logprobs is not None:
        logprobs = logprobs_object([event.logprob] if event.logprob is not None else [], shift)
        if prompt[1] is not None:
            logprobs = {key: prompt[1][key] + values for key, values in logprobs.items()}
    choice = {"text": prompt[0] + event.text, "index": s.tag.index, "logprobs": logprobs,
              "finish_reason": s.finish_reason if event.finished else None}
    return f"data: {orjson.dumps({**head, 'choices': [choice]}).decode()}\n\n"


def encode_usage_chunk(head: dict, work: Work, sequences: list[Sequence]) -> str:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return f"data: {json.dumps({**head, 'choices': [], 'usage': usage(work, sequences)})}\n\n"
