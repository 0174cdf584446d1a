"""Pictures of a model's insides: attention weights (computed by hand) as maps, position-embedding
similarity, and how the fused qkv weight splits into heads. (The attention the model runs is in
gpt/model.py.)

    python -m gpt.pictures RUN_OR_CHECKPOINT_DIR --text "ROMEO: ..." --out attn.png [--positions-out pos.png]

The model computes attention with a fused kernel that never materialises the weights. Here one
head is computed the tutorial's way, from the model's own weights: project the LayerNorm'd input
to queries, keys and values; score every query against every key, q·k / sqrt(D); hide the future
(causal mask); softmax each row into weights; take the weighted sum of the values. The result
matches the model's attention module (tests/test_teach.py holds it to 1e-5).

Needs matplotlib for the pictures (`pip install .[teach]`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt.model import GPT, CausalSelfAttention, rotate


def head_by_hand(attn: CausalSelfAttention, x: torch.Tensor, head: int,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One head of `attn` on x (B, T, C), step by step: (weights (B, T, T), output (B, T, D)). With
    grouped-query attention the head reads the key and value of its group; with `rope` (llama, the
    model's Rotary for positions 0..T-1), its query and key are turned by their positions first."""
    B, T, C = x.shape
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * D, K * D, K * D], dim=2)  # all heads side by side
    group = head // (H // K)  # the key/value head this query head shares (itself without grouping)
    q = q[..., head * D:(head + 1) * D]  # (B, T, D): this head's query for each token
    k = k[..., group * D:(group + 1) * D]  # (B, T, D): its key
    v = v[..., group * D:(group + 1) * D]  # (B, T, D): its value
    if rope is not None:
        cos, sin = (r[:, 0] for r in rope)  # (B, T, D)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = q @ k.transpose(1, 2) / math.sqrt(D)  # (B, T, T): how well each query matches each key
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))  # a token may not look ahead
    weights = F.softmax(scores, dim=-1)  # (B, T, T): each row sums to 1
    return weights, weights @ v  # (B, T, D): the weighted sum of values


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and head for ids (1, T): (L, H, T, T)."""
    model.eval()
    x, rope = model.embed(ids, torch.arange(ids.shape[1], device=ids.device)[None])  # (1, T, C), llama's angles
    layers = []
    for block in model.blocks:
        h = block.ln_1(x)
        layers.append(torch.stack([head_by_hand(block.attn, h, i, rope)[0][0] for i in range(block.attn.num_heads)]))
        x, _ = block(x, None, None, rope)
    return torch.stack(layers)


def _label(c: str) -> str:
    return {"\n": "\\n", " ": "␣"}.get(c, c)


def plot_attention(weights: torch.Tensor, text: str | list[str], out: str | Path, title: str = "") -> Path:
    """A grid of heatmaps, one per (layer, head): rows are queries, columns keys, tokens on the axes.
    The masked future (above the diagonal) is hatched grey, apart from weights that are merely near zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L, H, T, _ = weights.shape
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    size = max(2.2, 0.16 * T)
    fig, axes = plt.subplots(L, H, figsize=(size * H + 1.5, size * L + 1.2), squeeze=False, layout="constrained")
    labels = [_label(c) for c in text]
    font = max(4, min(9, int(200 / T)))
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            shown = np.ma.masked_array(weights[layer, head].cpu().numpy(), mask=future)
            image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, fontsize=font, family="monospace")
            ax.set_yticklabels(labels, fontsize=font, family="monospace")
            ax.tick_params(length=0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=10)
            if head == 0:
                ax.set_ylabel("query (attends from)", fontsize=9)
            if layer == L - 1:
                ax.set_xlabel("key (attends to)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (grey: the future, masked)")
    fig.suptitle(title or f"attention weights over {T} tokens: each row (a query) spreads weight 1 over the "
                 "keys at or before it (brighter = more)", fontsize=12)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def position_similarity(model: GPT) -> torch.Tensor:
    """Cosine similarity between every two learned position embeddings: (block_size, block_size)."""
    if model.config.arch == "llama":
        raise ValueError("a llama model has no position embeddings (positions turn queries and keys: rotary); "
                         "draw its attention maps, without --positions-out")
    with torch.no_grad():
        p = F.normalize(model.position_embedding.weight.float(), dim=-1)
        return (p @ p.T).cpu()


def plot_positions(models: dict[str, GPT] | GPT, out: str | Path) -> Path:
    """Position-embedding similarity, one panel per model (e.g. {"untrained": a, "trained": b})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = models if isinstance(models, dict) else {"this model": models}
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 1, 5), squeeze=False, layout="constrained")
    for ax, (name, model) in zip(axes[0], models.items()):
        image = ax.imshow(position_similarity(model).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("position")
        ax.set_ylabel("position")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle("cosine similarity between the position embeddings of every two positions", fontsize=12)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_qkv_split(attn: CausalSelfAttention, out: str | Path) -> Path:
    """How the fused qkv weight (3C, C) splits: three blocks of C rows (Q, K, V), each cut into H heads of
    D rows. Row r of the weight makes output feature r, so head h's query is rows h*D..(h+1)*D-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = attn.qkv.weight.detach().float().cpu().numpy()  # (3C, C)
    C, H, D = w.shape[1], attn.num_heads, attn.head_dim
    fig, ax = plt.subplots(figsize=(5.5, 8), layout="constrained")
    limit = float(abs(w).max())
    ax.imshow(w, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for part, name in enumerate("QKV"):
        for h in range(H):
            top = part * C + h * D
            ax.axhline(top - 0.5, color="black" if h == 0 else "grey", linewidth=1.5 if h == 0 else 0.5)
            ax.text(C + 0.5, top + D / 2, f"{name} head {h}", va="center", fontsize=8)
    ax.set_xlabel(f"input feature (C = {C})")
    ax.set_ylabel(f"output feature: 3C = {3 * C} rows")
    ax.set_title(f"qkv.weight, ({3 * C}, {C}): Q, K, V, each split into {H} heads of D = {D}", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt.pictures",
        description="Draw the attention weights of every layer and head over a text, and optionally the "
        "similarity of the learned position embeddings.",
        epilog='Example: python -m gpt.pictures runs/shakespeare_char_cpu --text "ROMEO: But soft" --out attn.png',
    )
    parser.add_argument("source", help="a run's out_dir or a checkpoint folder")
    parser.add_argument("--text", required=True, help="the text to attend over (at most block_size characters)")
    parser.add_argument("--out", default="attention.png")
    parser.add_argument("--positions-out", default=None, help="also draw position-embedding similarity here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from gpt.checkpoint import CheckpointError
    from gpt.cli import run_command

    return run_command(lambda: draw(args.source, args.text, args.out, args.positions_out),
                       (CheckpointError, ValueError))


def draw(source: str, text: str, out: str, positions_out: str | None) -> None:
    from gpt.checkpoint import load_checkpoint

    model, tokenizer, meta = load_checkpoint(source)
    ids = tokenizer.encode(text) if text else []
    if not ids or len(ids) > model.config.block_size:
        raise ValueError(f"--text must be 1 to {model.config.block_size} tokens (the model's block_size)")
    weights = attention_weights(model, torch.tensor([ids]))
    labels = text if len(text) == len(ids) else [tokenizer.decode([i]) for i in ids]
    path = plot_attention(weights, labels, out, f"attention weights at step {meta.get('step')}: rows attend to "
                                                "columns (brighter = more)")
    print(f"wrote {path}")
    if positions_out:
        print(f"wrote {plot_positions(model, positions_out)}")


if __name__ == "__main__":
    sys.exit(run())
