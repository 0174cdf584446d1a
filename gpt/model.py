"""A decoder-only transformer (GPT), read top to bottom like the tutorial it comes from.

    tokens ─► token embedding + position embedding ─► N × Block ─► LayerNorm ─► LM head ─► logits
    Block:  x = x + SelfAttention(LayerNorm(x));  x = x + FeedForward(LayerNorm(x))

That is the tutorial's model, GPT-2's architecture (`arch: gpt2`). The Llama family (`arch: llama`:
SmolLM2, TinyLlama) changes four parts, each a small class below, and keeps the rest:
- no position embedding: rotary embeddings turn each query and key by angles set by its position
  (`Rotary`), so attention scores depend on how far apart two tokens are;
- RMSNorm instead of LayerNorm: scale by the root mean square, no mean, no bias (`RMSNorm`);
- a gated MLP: silu(gate(x)) * up(x), projected down (`GatedFeedForward`, SwiGLU);
- grouped-query attention: fewer key/value heads than query heads, each shared by a group of
  queries, so the KV cache is num_heads / num_kv_heads times smaller.

Shapes in comments use B = batch, T = new tokens in this call, P = tokens already in the KV cache,
C = embedding_dim, H = num_heads, K = num_kv_heads (H for gpt2), D = head_dim = C / H, V = vocab_size,
F = the MLP's hidden width.

One `forward` serves training (whole sequences, causal mask) and generation (a few new tokens
against a cache of keys and values from earlier calls). With a cache, the mask is built from
positions: `scaled_dot_product_attention(is_causal=True)` aligns its triangle to the top-left
corner, which is only right when the queries and keys start at the same position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt.config import ModelConfig

# The KV cache: one (key, value) pair per layer, each (B, K, P, D).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy over targets, when targets are given
    present: KVCache | None  # the cache extended by this call's keys and values, when use_cache


class RMSNorm(nn.Module):
    """Llama's normalization: x / sqrt(mean(x²) + eps) * gain. Unlike LayerNorm it neither subtracts
    the mean nor adds a bias: cheaper, and as good in practice."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 as transformers does, so bf16 training normalizes as the fp32 reference does
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight  # (B, T, C)


def norm(config: ModelConfig) -> nn.Module:
    """The family's normalization layer: LayerNorm (gpt2) or RMSNorm (llama)."""
    if config.arch == "llama":
        return RMSNorm(config.embedding_dim, config.norm_eps)
    return nn.LayerNorm(config.embedding_dim, eps=config.norm_eps, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE): the cos and sin of each position's angles, made once per
    forward and shared by every layer.

    Dimension pair (d, d + D/2) of a query or key at position p turns by the angle p * theta^(-2d/D):
    fast-turning pairs tell near positions apart, slow ones far ones. A turned query and key have the
    dot product of the unturned pair at the angle between their positions: attention sees offsets.
    (Pairs are (d, d + D/2), "rotate half", as transformers' Llama has them.)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta  # no weights, and no buffer to load

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.head_dim
        exponents = torch.arange(0, D, 2, dtype=torch.float32, device=position_ids.device) / D
        inv_freq = 1.0 / (self.theta ** exponents)  # (D/2,): pair d turns theta^(-2d/D) radians per position
        angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): pair (d, d + D/2) shares an angle
        return angles.cos()[:, None], angles.sin()[:, None]  # 2 × (B, 1, T, D), broadcast over heads


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x1, x2) = (x[d], x[d + D/2]) by its angle: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 × (B, heads, T, D/2)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)  # (B, heads, T, D)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: every token mixes in the values of the tokens before it.

    Each head projects x to queries, keys and values (one fused Linear makes all three for all
    heads), scores each query against each key as q·k / sqrt(D), masks the future, softmaxes the
    scores into weights and takes the weighted sum of values. The heads' outputs are concatenated
    and projected back to C.

    Grouped-query attention (llama, num_kv_heads = K < H): there are K key and value heads, each
    shared by H / K query heads. Only K heads are computed and cached; they are repeated for the
    score. With rotary embeddings (`rope`), queries and keys are turned by their positions first.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        qkv_dim = (config.num_heads + 2 * config.kv_heads) * config.head_dim  # 3C without grouping
        self.qkv = nn.Linear(config.embedding_dim, qkv_dim, bias=config.bias)
        self.proj = nn.Linear(config.embedding_dim, config.embedding_dim, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=2)  # (B, T, C), 2 × (B, T, K·D)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:  # llama: turn queries and keys by their positions
            q, k = rotate(q, *rope), rotate(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, K, P+T, D)
            v = torch.cat([past[1], v], dim=2)  # (B, K, P+T, D)
        present = (k, v)  # the cache keeps K heads
        # each key/value head serves H / K query heads: the CPU's causal kernel takes them grouped as they
        # are (enable_gqa, about 0.8x the time of repeating them); elsewhere they are repeated to H heads
        grouped = K < H and mask is None and q.device.type == "cpu"
        if K < H and not grouped:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # 2 × (B, H, P+T, D)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # training: queries and keys are the same positions, the fast causal kernel is right
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               enable_gqa=grouped)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y)), present


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


class GatedFeedForward(nn.Module):
    """Llama's MLP (SwiGLU): a SiLU-activated gate multiplies a second projection, then down to C.
    The gate lets each hidden unit switch its own signal on and off."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        F_ = config.mlp_dim
        self.gate = nn.Linear(config.embedding_dim, F_, bias=config.bias)
        self.up = nn.Linear(config.embedding_dim, F_, bias=config.bias)
        self.proj = nn.Linear(F_, config.embedding_dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C) -> 2 × (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """One transformer block: pre-norm attention and feed-forward, each added to the residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = GatedFeedForward(config) if config.arch == "llama" else FeedForward(config)

    def forward(self, x, mask, past, rope=None):
        a, present = self.attn(self.ln_1(x), mask, past, rope)
        x = x + a  # residual: attention adds to the stream rather than replacing it
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """The whole model: embeddings, a stack of blocks, a final norm and the LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is unset: take it from the tokenizer")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        if config.arch == "llama":  # positions enter attention as rotations, not as a table
            self.rotary = Rotary(config)
        else:
            self.position_embedding = nn.Embedding(config.block_size, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # train.activation_checkpointing: memory for compute
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
        document_ids: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Logits for every position of `input_ids` (B, T), continuing the cache `past` if given.

        attention_mask: (B, P+T), 1 for real tokens and 0 for left padding, covering cache and input.
        position_ids: (B, T), each token's position; by default P..P+T-1, or counted from the first
            real token when attention_mask is given (so left-padded prompts start at position 0).
        targets: (B, T) next-token ids; the loss ignores targets equal to -100.
        use_cache: return `present`, the cache extended by this call (default: when `past` is given).
        document_ids: (B, T), packed rows (gpt.sft): each token's document, the only one it attends to.
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
        visible = None
        if document_ids is not None:  # packed documents: causal within each, blind to the others
            visible, position_ids = document_mask(document_ids)  # (B, 1, T, T), (B, T)
        elif past is not None or attention_mask is not None:
            key_index = torch.arange(P + T, device=device).expand(B, P + T)  # (B, P+T)
            visible = attention_mask_from_positions(key_index[:, P:], key_index, attention_mask)  # (B, 1, T, P+T)
        mask = None if visible is None else additive_mask(visible, self.token_embedding.weight.dtype)

        x, rope = self.embed(input_ids, position_ids)  # (B, T, C), the rotary angles (llama) or None
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = self.run_block(block, x, mask, None if past is None else past[i], rope)  # (B, T, C)
            present.append(kv)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if use_cache is None:
            use_cache = past is not None
        return GPTOutput(logits, loss, present if use_cache else None)

    def run_block(self, block: Block, x, mask, past, rope):
        """One block. With activation_checkpointing, training keeps only the block's input, and backward
        runs the block again for what it needs: less memory for about a third more compute."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, mask, past, rope, use_reentrant=False)
        return block(x, mask, past, rope)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        """What each token is, and where: gpt2 adds a learned position vector to the token's; llama
        leaves the token alone and returns each position's rotary angles for every layer's q and k."""
        x = self.token_embedding(input_ids)  # (B, T, C): what each token is
        rope = None
        if self.config.arch == "llama":
            rope = self.rotary(position_ids)  # 2 × (B, 1, T, D)
        else:
            x = x + self.position_embedding(position_ids)  # (B, T, C): where each token is
        return self.dropout(x), rope

    # --- bookkeeping -------------------------------------------------------------------------

    def num_parameters(self, exclude_positions: bool = True) -> int:
        """Parameter count; by default without the position embedding (as nanoGPT and the MFU formula)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.config.arch != "llama":
            n -= self.position_embedding.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·D·T."""
        c = self.config
        T = context or c.block_size
        return 6 * self.num_parameters() + 12 * c.num_layers * c.num_heads * c.head_dim * T

    @torch.no_grad()
    def grow_vocabulary(self, vocab_size: int) -> None:
        """Make room for tokens added to the tokenizer (a chat template's markers): new rows of the
        embedding (and of an untied head) start at the mean of the old ones, so a new token begins as
        an average token rather than as noise that the first steps must undo."""
        old = self.config.vocab_size
        if vocab_size == old:
            return
        if vocab_size < old:
            raise ValueError(f"the vocabulary can only grow: {old} -> {vocab_size}")
        grown = nn.Embedding(vocab_size, self.config.embedding_dim).to(self.token_embedding.weight)
        grown.weight[:old] = self.token_embedding.weight
        grown.weight[old:] = self.token_embedding.weight.mean(0)
        head = nn.Linear(self.config.embedding_dim, vocab_size, bias=False).to(self.lm_head.weight)
        head.weight[:old] = self.lm_head.weight
        head.weight[old:] = self.lm_head.weight.mean(0)
        self.token_embedding = grown
        self.lm_head = head
        if self.config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (Linear and embedding weights), not biases or norm gains."""
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


def document_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (several documents one after another): each token sees the earlier tokens of its
    own document only, and its position counts from where its document starts. (B, 1, T, T) visible,
    and (B, T) positions."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(-1).values  # (B, T): where each token's document starts
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return ((index[:, None] >= index[None, :]) & same).unsqueeze(1), index - first


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, a large negative number elsewhere: added to the scores before softmax.

    An additive mask exports to a plain Add; a boolean one makes the exported SDPA select with
    Where and guard against all-masked rows with IsNaN, which costs a third of a prefill on CPU.
    """
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
