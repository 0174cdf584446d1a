"""The playground: a page at GET / to try the model in a browser, token by token, with probabilities.

The page is plain HTML, CSS and JavaScript in serve/static (no build step, nothing loaded from another
host). It is a client of the same API as any other: it streams /v1/completions with `logprobs: 5`
(or, in its chat view for a model with a chat template, /v1/chat/completions with `top_logprobs: 5`),
shades each token by the probability the model gave it and shows the alternatives on hover; Stop
aborts the request, which the server then cancels. With --api-key the page asks for the key and keeps
it in memory. GET /props describes the model for the page's header.

Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from serve.runtime import OnnxModel

STATIC = Path(__file__).with_name("static")


def add_playground(app: FastAPI, model: OnnxModel, model_id: str) -> None:
    """GET / is the playground (serve/static: plain HTML, CSS and JavaScript, nothing from another host),
    which talks to /v1/completions like any client; GET /props describes the model for it."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    c = model.manifest["model"]

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/props")
    async def props():
        return {"model": model_id, "variant": model.variant, "parameters": parameter_count(c),
                "tokenizer": model.tokenizer.kind, "vocab_size": model.vocab_size, "block_size": model.block_size,
                "chat": model.tokenizer.chat is not None}


def parameter_count(c: dict) -> int:
    """A GPT's parameters from its config (gpt/model.py's layout): embeddings, blocks, final norm, head.
    A llama (rotary positions, RMSNorm, SwiGLU, K key/value heads) has no position table, one gain per
    norm and three MLP matrices."""
    C, L, bias = c["embedding_dim"], c["num_layers"], c.get("bias", True)
    head = 0 if c.get("tie_embeddings") else c["vocab_size"] * C
    if c.get("arch") == "llama":
        from gpt.config import model_config_from_dict  # no torch: the config's own rules for K and F

        m = model_config_from_dict(c)
        F, qkv = m.mlp_dim, (m.num_heads + 2 * m.kv_heads) * m.head_dim
        block = C * qkv + C * C + 3 * C * F + 2 * C + ((qkv + C + 2 * F + C) if bias else 0)
        return c["vocab_size"] * C + L * block + C + head
    block = 12 * C * C + (13 * C if bias else 4 * C)  # attention and MLP matrices, their biases, two LayerNorms
    return c["vocab_size"] * C + c["block_size"] * C + L * block + (2 if bias else 1) * C + head
