"""OpenAI's chat completions API as this server speaks it: `messages` to one prompt through the model's
chat template (gpt.chat), and the answer back as a `chat.completion` or its `chat.completion.chunk`s.

The prompt is the template rendered with add_generation_prompt, encoded as training encoded it, so
the model reads what it was fine-tuned on. The answer ends at the template's end-of-turn token
(which is not part of the content), at a `stop` string, or at the token limit (max_completion_tokens,
or its older name max_tokens; by default the server's limit). `logprobs: true` gives each content
token's log-probability, with `top_logprobs` (0 to 5) alternatives, from the model's own
distribution; `n` answers share the prompt. A template that fails on the messages, or tries to leave
its sandbox, is a 400 for that request; so is a request to a model that has no template.

Imports no torch.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from gpt.chat import ConversationError, TemplateError, check_messages
from gpt.tokenizer import Tokenizer, stop_ids
from serve.batch import Event, Sequence
from serve.generate import validate_request
from serve.protocol import MAX_LOGPROBS, RequestError, SamplingRequest, Work, check_model, sampling, usage
from serve.runtime import OnnxModel
from serve.scheduler import Limits
from serve.scoring import TokenLogprob


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | None = None
    name: str | None = None  # accepted and ignored, as by most servers


class ChatCompletionRequest(SamplingRequest):
    """The OpenAI chat completions request this server understands (decode_chat_request checks it)."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None  # only {"type": "text"}, the default


def decode_chat_request(body: ChatCompletionRequest, model: OnnxModel, limits: Limits, model_id: str) -> Work:
    """Check a parsed body against the model and limits; render the messages into the prompt's ids."""
    tokenizer = model.tokenizer
    check_model(body, model_id)
    if body.response_format not in (None, {"type": "text"}):
        raise RequestError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if (body.top_logprobs or 0) > MAX_LOGPROBS:
        raise RequestError(400, f"top_logprobs: must be at most {MAX_LOGPROBS}", "top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None and \
            body.max_tokens != body.max_completion_tokens:
        raise RequestError(400, "max_tokens and max_completion_tokens differ: send one", "max_completion_tokens")
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens = asked or limits.max_new_tokens
    if max_tokens > limits.max_new_tokens:
        raise RequestError(400, f"max_completion_tokens: must be at most {limits.max_new_tokens}",
                           "max_completion_tokens")
    stops, params, seed, include_usage = sampling(body, limits, prompts=1)
    try:
        ids = tokenizer.encode(render_messages(tokenizer, body.messages, True))
    except ValueError as e:  # a character the vocabulary lacks
        raise RequestError(400, f"messages: {e}", "messages") from None
    try:
        ids = validate_request(tokenizer, ids, max_tokens, limits.max_new_tokens, limits.max_prompt_tokens)
    except ValueError as e:
        raise RequestError(400, str(e), "messages") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Work([ids], body.n, max_tokens, params, stops, seed, body.stream, logprobs, False, include_usage)


def no_template(tokenizer: Tokenizer) -> None:
    if tokenizer.chat is None:
        raise RequestError(400, "this model has no chat template, so it cannot take messages: fine-tune it on "
                           "conversations (data.format=chat) and export again, or add a chat_template (and its "
                           "eos_token) to tokenizer_config.json in the export folder; or use /v1/completions",
                           "messages")


def render_messages(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    """The conversation as the model reads it (its template, in the sandbox), or a 400 naming the problem."""
    no_template(tokenizer)
    try:
        checked = check_messages([m.model_dump(exclude_none=True) | {"content": m.content or ""} for m in messages])
        return tokenizer.chat.render(checked, add_generation_prompt)
    except (ConversationError, TemplateError) as e:
        raise RequestError(400, str(e), "messages") from None


# --- encoding -----------------------------------------------------------------------------------------

def chat_head(model_id: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id}


def ended_on_turn(tokenizer: Tokenizer, s: Sequence) -> bool:
    """Whether the last generated token is the end of the turn (or of the document): not content."""
    return s.finish_reason == "stop" and bool(s.generated) and s.generated[-1] in stop_ids(tokenizer)


def content_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat `logprobs.content`: per token its text, logprob, UTF-8 bytes and alternatives."""
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in (e.top or {}).items()]}
            for e in entries]


def encode_chat_response(head: dict, tokenizer: Tokenizer, sequences: list[Sequence], work: Work) -> dict:
    """The whole chat completion, once every answer has finished."""
    choices = []
    for s in sequences:
        entries = s.entries[:-1] if ended_on_turn(tokenizer, s) else s.entries
        choices.append({"index": s.tag.index, "message": {"role": "assistant", "content": s.text},
                        "logprobs": {"content": content_logprobs(entries)} if work.logprobs is not None else None,
                        "finish_reason": s.finish_reason})
    return {**head, "choices": choices, "usage": usage(work, sequences)}


def encode_chat_chunk(head: dict, tokenizer: Tokenizer, event: Event, work: Work, first: bool) -> str:
    """The server-sent events of one step of one answer: its role first, then pieces of content."""
    s = event.sequence
    out = ""
    chunk = {**head, "object": "chat.completion.chunk"}
    if first:
        role = {"index": s.tag.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}
        out += f"data: {json.dumps({**chunk, 'choices': [role]})}\n\n"
    closing = event.finished and ended_on_turn(tokenizer, s)
    logprobs = None
    if work.logprobs is not None:
        logprobs = {"content": [] if closing or event.logprob is None else content_logprobs([event.logprob])}
    delta = {"content": event.text} if event.text or not event.finished else {}
    choice = {"index": s.tag.index, "delta": delta, "logprobs": logprobs,
              "finish_reason": s.finish_reason if event.finished else None}
    return out + f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"

