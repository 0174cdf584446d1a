"""Looking inside: attention weights by hand, attention maps and position similarity as pictures.

    python -m gpt.attention RUN_OR_CHECKPOINT_DIR --text "ROMEO: ..." --out attn.png [--positions-out pos.png]

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

from gpt.model import GPT, CausalSelfAttention


def head_by_hand(attn: CausalSelfAttention, x: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head of `attn` on x (B, T, C), step by step: (weights (B, T, T), output (B, T, D))."""
    B, T, C = x.shape
    D = attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=2)  # (B, T, C) each, all heads side by side
    q = q[..., head * D:(head + 1) * D]  # (B, T, D): this head's query for each token
    k = k[..., head * D:(head + 1) * D]  # (B, T, D): its key
    v = v[..., head * D:(head + 1) * D]  # (B, T, D): its value
    scores = q @ k.transpose(1, 2) / math.sqrt(D)  # (B, T, T): how well each query matches each key
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))  # a token may not look ahead
    weights = F.softmax(scores, dim=-1)  # (B, T, T): each row sums to 1
    return weights, weights @ v  # (B, T, D): the weighted sum of values


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and head for ids (1, T): (L, H, T, T)."""
    model.eval()
    T = ids.shape[1]
    x = model.token_embedding(ids) + model.position_embedding(torch.arange(T, device=ids.device))
    layers = []
    for block in model.blocks:
        h = block.ln_1(x)
        layers.append(torch.stack([head_by_hand(block.attn, h, i)[0][0] for i in range(block.attn.num_heads)]))
        x, _ = block(x, None, None)
    return torch.stack(layers)


def _label(c: str) -> str:
    return {"\n": "\\n", " ": "␣"}.get(c, c)


def plot_attention(weights: torch.Tensor, text: str, out: str | Path, title: str = "") -> Path:
    """A grid of heatmaps, one per (layer, head): rows are queries, columns keys, characters on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H, T, _ = weights.shape
    size = max(2.2, 0.16 * T)
    fig, axes = plt.subplots(L, H, figsize=(size * H + 1.5, size * L + 1.2), squeeze=False, layout="constrained")
    labels = [_label(c) for c in text]
    font = max(4, min(9, int(200 / T)))
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer, head].cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
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
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title or f"attention weights over {T} characters (brighter = more attention)", fontsize=13)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_positions(model: GPT, out: str | Path) -> Path:
    """Cosine similarity between the learned position embeddings: (block_size, block_size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        p = F.normalize(model.position_embedding.weight.float(), dim=-1)
        similarity = (p @ p.T).cpu().numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    ax.set_title("learned position embeddings: similarity between positions\n"
                 "(a strong diagonal band: nearby positions are encoded alike)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt.attention",
        description="Draw the attention weights of every layer and head over a text, and optionally the "
        "similarity of the learned position embeddings.",
        epilog='Example: python -m gpt.attention runs/shakespeare_char_cpu --text "ROMEO: But soft" --out attn.png',
    )
    parser.add_argument("source", help="a run's out_dir or a checkpoint folder")
    parser.add_argument("--text", required=True, help="the text to attend over (at most block_size characters)")
    parser.add_argument("--out", default="attention.png")
    parser.add_argument("--positions-out", default=None, help="also draw position-embedding similarity here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from gpt.checkpoint import CheckpointError, load_checkpoint

    try:
        model, tokenizer, meta = load_checkpoint(args.source)
        if not args.text or len(args.text) > model.config.block_size:
            raise ValueError(f"--text must be 1 to {model.config.block_size} characters (the model's block_size)")
        ids = torch.tensor([tokenizer.encode(args.text)])
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights = attention_weights(model, ids)
    path = plot_attention(weights, args.text, args.out, f"attention weights at step {meta.get('step')}: "
                                                        f"rows attend to columns (brighter = more)")
    print(f"wrote {path}")
    if args.positions_out:
        print(f"wrote {plot_positions(model, args.positions_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
