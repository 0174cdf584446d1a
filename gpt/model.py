"""A decoder-only transformer (GPT), read top to bottom like the tutorial it comes from.

    tokens ─► token embedding + position embedding ─► N × Block ─► LayerNorm ─► LM head ─► logits
    Block:  x = x + SelfAttention(LayerNorm(x));  x = x + FeedForward(LayerNorm(x))

Shapes in comments use B = batch, T = new tokens in this call, P = tokens already in the KV cache,
C = embedding_dim, H = num_heads, D = head_dim = C / H, V = vocab_size.

One `forward` serves training (whole sequences, causal mask) and generation (a few new tokens
against a cache of keys and values from earlier calls). With a cache, the mask is built from
positions: `scaled_dot_product_attention(is_causal=True)` aligns its triangle to the top-left
corner, which is only right when the queries and keys start at the same position.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig

# The KV cache: one (key, value) pair per layer, each (B, H, P, D).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy over targets, when targets are given
    present: KVCache | None  # the cache extended by this call's keys and values, when use_cache


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: every token mixes in the values of the tokens before it.

    Each head projects x to queries, keys and values (one fused Linear makes all three for all
    heads), scores each query against each key as q·k / sqrt(D), masks the future, softmaxes the
    scores into weights and takes the weighted sum of values. The heads' outputs are concatenated
    and projected back to C.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim, bias=config.bias)
        self.proj = nn.Linear(config.embedding_dim, config.embedding_dim, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, D)
            v = torch.cat([past[1], v], dim=2)  # (B, H, P+T, D)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # training: queries and keys are the same positions, the fast causal kernel is right
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y)), (k, v)


class FeedForward(nn.Module):
    """Position-wise MLP: widen to 4C, GELU, project back. Where each token 'thinks' on its own."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.embedding_dim, 4 * config.embedding_dim, bias=config.bias)
        self.proj = nn.Linear(4 * config.embedding_dim, config.embedding_dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU with the tanh approximation, as GPT-2 has it (and cheaper than the erf form on CPU)
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block: pre-LayerNorm attention and feed-forward, each added to the residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embedding_dim, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.embedding_dim, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x, mask, past):
        a, present = self.attn(self.ln_1(x), mask, past)
        x = x + a  # residual: attention adds to the stream rather than replacing it
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """The whole model: embeddings, a stack of blocks, a final LayerNorm and the LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is unset: take it from the tokenizer")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.position_embedding = nn.Embedding(config.block_size, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embedding_dim, bias=config.bias)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:  # one matrix reads tokens in and writes logits out (GPT-2, weight tying)
            self.lm_head.weight = self.token_embedding.weight
        # GPT-2's scaled init: each residual projection is one of 2*num_layers additions to the stream
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        past: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> GPTOutput:
        """Logits for every position of `input_ids` (B, T), continuing the cache `past` if given.

        attention_mask: (B, P+T), 1 for real tokens and 0 for left padding, covering cache and input.
        position_ids: (B, T), each token's position; by default P..P+T-1, or counted from the first
            real token when attention_mask is given (so left-padded prompts start at position 0).
        targets: (B, T) next-token ids; the loss ignores targets equal to -100.
        use_cache: return `present`, the cache extended by this call (default: when `past` is given).
        """
        B, T = input_ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                # position of each token = number of real tokens before it
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)
            else:
                position_ids = torch.arange(P, P + T, device=device).expand(B, T)  # (B, T)
        # (with an attention_mask, positions come from it; the check would also add shape guards to an export)
        if attention_mask is None and not torch.compiler.is_compiling() and P + T > self.config.block_size:
            raise ValueError(
                f"{P + T} tokens exceed block_size={self.config.block_size}: crop the context "
                "(gpt.sampling.refill_context) before calling the model"
            )

        # Masking: training (no cache, no padding) uses the fused causal kernel. Otherwise build the
        # mask from positions: key j (of P+T) is visible to query i when j <= P + i, and is real.
        mask = None
        if past is not None or attention_mask is not None:
            key_index = torch.arange(P + T, device=device).expand(B, P + T)  # (B, P+T)
            visible = attention_mask_from_positions(key_index[:, P:], key_index, attention_mask)  # (B, 1, T, P+T)
            mask = additive_mask(visible, self.token_embedding.weight.dtype)

        tok = self.token_embedding(input_ids)  # (B, T, C): what each token is
        pos = self.position_embedding(position_ids)  # (B, T, C): where each token is
        x = self.dropout(tok + pos)  # (B, T, C)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past is None else past[i])  # (B, T, C)
            present.append(kv)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if use_cache is None:
            use_cache = past is not None
        return GPTOutput(logits, loss, present if use_cache else None)

    # --- bookkeeping -------------------------------------------------------------------------

    def num_parameters(self, exclude_positions: bool = True) -> int:
        """Parameter count; by default without the position embedding (as nanoGPT and the MFU formula)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.position_embedding.weight.numel() if exclude_positions else n

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·D·T."""
        c = self.config
        T = context or c.block_size
        return 6 * self.num_parameters() + 12 * c.num_layers * c.num_heads * c.head_dim * T

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (Linear and embedding weights), not biases or LayerNorm gains."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- masks for cached and padded attention ---------------------------------------------------------
#
# Training sees whole sequences and uses the fused causal kernel. With a KV cache (P earlier tokens,
# T new ones) or left padding, the mask is built from positions instead: key j is visible to query i
# when j <= P + i and j is a real token.

def attention_mask_from_positions(
    query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Which keys each query may look at: (B, 1, T, P+T) bool, True = visible.

    A key is visible to a query when it is not in the future (key_pos <= query_pos) and is a real
    token, not left padding (key_valid). A padded query would then see nothing, and a softmax over
    nothing is NaN, so every query may always see its own slot (the last T keys are this call's).
    """
    visible = key_pos[:, None, :] <= query_pos[:, :, None]  # (B, T, P+T)
    if key_valid is not None:
        visible = visible & key_valid[:, None, :].bool()
    T, S = query_pos.shape[1], key_pos.shape[1]
    own = torch.arange(S, device=query_pos.device)[None, :] == torch.arange(S - T, S, device=query_pos.device)[:, None]
    return (visible | own[None]).unsqueeze(1)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, a large negative number elsewhere: added to the scores before softmax.

    An additive mask exports to a plain Add; a boolean one makes the exported SDPA select with
    Where and guard against all-masked rows with IsNaN, which costs a third of a prefill on CPU.
    """
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
