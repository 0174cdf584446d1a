"""The model's own tokenizer over HTTP, as vLLM serves it: POST /tokenize (text, or a conversation through
the chat template), POST /detokenize, GET /tokenizer_info. lm-evaluation-harness's remote tokenizer
uses these; llama.cpp's `content` is accepted too.

Imports no torch.
"""

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from gpt.tokenizer import EOT
from serve.chat import Message, render_messages
from serve.protocol import RequestError
from serve.runtime import OnnxModel


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None  # vLLM's name
    content: str | None = None  # llama.cpp's name
    messages: list[Message] | None = None  # vLLM's: a conversation, through the model's chat template
    add_generation_prompt: bool = True  # with messages: end where the assistant's answer starts
    add_special_tokens: bool = False  # accepted: the model has no special tokens to add


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, model: OnnxModel, model_id: str) -> None:
    """POST /tokenize, POST /detokenize, GET /tokenizer_info: the model's own tokenizer over HTTP, as vLLM
    serves it (lm-evaluation-harness's remote tokenizer uses these); llama.cpp's `content` works too."""
    tokenizer = model.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        text = body.prompt if body.prompt is not None else body.content
        if body.messages is not None:
            text = render_messages(tokenizer, body.messages, body.add_generation_prompt)
        if text is None:
            raise RequestError(400, "give the text to tokenize as 'prompt' (or 'content'), or a conversation as "
                               "'messages'", "prompt")
        try:
            tokens = tokenizer.encode(text)
        except ValueError as e:  # a character the vocabulary lacks
            raise RequestError(400, str(e), "prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.block_size}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(400, f"token {bad[0]} is not in the vocabulary (0 to {tokenizer.vocab_size - 1})",
                               "tokens")
        text = tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eot = EOT if tokenizer.eot_id is not None else None
        chat = tokenizer.chat
        return {"tokenizer_class": f"gpt.{tokenizer.kind}", "model": model_id, "vocab_size": tokenizer.vocab_size,
                "model_max_length": model.block_size, "eos_token": chat.eos_token if chat else eot,
                "bos_token": eot, "pad_token": eot, "chat_template": chat.template if chat else None}
