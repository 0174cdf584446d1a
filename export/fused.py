"""The fused graph: the model written the way onnxruntime's own LLM graphs are.

The portable graph (`model.onnx`, export/portable.py) holds the model in standard ONNX ops, about 40
nodes per block, and a KV cache that grows by Concat, so every step copies it. This file writes the
same model from the checkpoint's weights with onnxruntime's fused
`com.microsoft` ops, about 9 nodes per block:

    ids, positions ─► Gather(wte) , Gather(wpe) ─► SkipLayerNormalization ─► (x, ln_1(x))
    per block:
        MatMul(W_qkv) + bias ─► GroupQueryAttention(packed QKV, past, seqlens_k, total_length)
        MatMul(W_proj) ─► SkipLayerNormalization(+ bias, + residual) ─► (x, ln_2(x))
        MatMul(W_fc) ─► FastGelu(+ bias) ─► MatMul(W_fc_proj) ─► SkipLayerNormalization(+ bias, + residual)
    the last SkipLayerNormalization is ln_f ─► Slice(the last logits_to_keep positions) ─► MatMul(lm_head) ─► logits

GroupQueryAttention (with as many key/value heads as query heads, which is plain multi-head
attention) takes the packed QKV straight from the MatMul and keeps the cache in BNSH layout,
(batch, heads, max_sequence, head_dim). When the caller binds one buffer as both past and present
(`past_present_share_buffer`), the op writes each new key and value in place at row `seqlens_k`:
nothing is copied. Sequences are right-padded: `attention_mask` has a 1 for each real token, from
which the graph derives `seqlens_k` (real tokens - 1) and `total_sequence_length` (its width), as
onnxruntime-genai's model builder does. Learned absolute positions stay outside the op: the caller
passes `position_ids`.

A llama (`arch: llama`) is written the same way with its own pieces: RMSNorm as
SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization; GroupQueryAttention with
`kv_num_heads` key/value heads, whose cache holds those K heads, turning the packed queries and keys
itself (`do_rotary`) by the rows of two tables of rotary angles, `cos_cache` and `sin_cache` (the
same cos and sin as gpt/model.py's, one row per position), as onnxruntime-genai's model builder
writes it; and the SwiGLU MLP as two MatMuls, Sigmoid and Mul. The op turns heads of a multiple of
16 dimensions only; a smaller head (the tests' tiny models) is split from the packed QKV and turned
in standard ops before the op (`make_turned`).

The graph carries the Optimum names, so the same runtime code binds it; what differs is recorded in
the manifest (`cache: "shared"`).

Imports no torch at module level; `FusedBuilder` reads a GPT's state dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.onnxfile import WeightFile
from serve.manifest import LOGITS_TO_KEEP, input_names, output_names

MS = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "SkipLayerNormalization", "FastGelu", "SkipSimplifiedLayerNormalization")


class FusedBuilder:
    """Writes the fused graph of a gpt.model.GPT, one `make_*` method per piece, in the shape of
    onnxruntime-genai's model builder: each method appends its nodes and initializers and returns
    the name of the tensor it produced.

    dtype float16 stores weights and computes in fp16 (what GroupQueryAttention needs on CUDA), with
    fp16 past/present and fp32 logits."""

    def __init__(self, model, opset: int = 18, dtype: str = "float32", weights: WeightFile | None = None):
        from onnx import TensorProto

        c = model.config
        self.config, self.opset, self.dtype = c, opset, dtype
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
        # views of the model's own tensors (fp32 on the CPU already): nothing is copied until written
        self.state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        self.weights = weights
        self.nodes, self.inits = [], []
        # GroupQueryAttention turns a llama's queries and keys itself when its heads are a multiple of 16 wide
        self.rotary_in_attention = c.arch == "llama" and c.head_dim % 16 == 0

    # --- the pieces --------------------------------------------------------------------------------

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer: in the graph, or streamed to the data file when the builder has one."""
        from onnx import numpy_helper

        array = np.ascontiguousarray(array.astype(self.np_dtype, copy=False))
        self.inits.append(self.weights.tensor(name, array) if self.weights else numpy_helper.from_array(array, name))
        return name

    def const(self, name: str, array) -> str:
        """A small constant of the graph (shapes, axes, scalars), kept in the graph itself."""
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ln_params(self, ln: str) -> list[str]:
        """LayerNorm `ln`'s gain and bias as initializers (the bias "" when the model has none)."""
        bias = self.weight(f"{ln}.bias", self.state[f"{ln}.bias"]) if f"{ln}.bias" in self.state else ""
        return [self.weight(f"{ln}.weight", self.state[f"{ln}.weight"]), bias]

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                           **attrs))

    def make_linear(self, x: str, prefix: str, out: str, bias_in_next: bool = False) -> str | None:
        """x @ W^T (+ b): returns the bias name when the caller fuses it into the next op."""
        w = self.weight(f"{prefix}.weight_t", self.state[f"{prefix}.weight"].T)
        bias = f"{prefix}.bias" if f"{prefix}.bias" in self.state else None
        if bias is None or bias_in_next:
            self.node("MatMul", [x, w], [out])
            return self.weight(bias, self.state[bias]) if bias else None
        self.node("MatMul", [x, w], [f"{out}.nobias"])
        self.node("Add", [f"{out}.nobias", self.weight(bias, self.state[bias])], [out])
        return None

    def make_skip_layer_norm(self, x: str, skip: str, ln: str, bias: str | None, out: str, residual: str) -> None:
        """(x + skip + bias) → `residual`, and its LayerNorm `ln` → `out`, in one op (a llama's RMSNorm:
        SkipSimplifiedLayerNormalization, which has no bias)."""
        if self.config.arch == "llama":
            self.node("SkipSimplifiedLayerNormalization", [x, skip, self.ln_params(ln)[0]], [out, "", "", residual],
                      domain=MS, epsilon=self.config.norm_eps)
            return
        self.node("SkipLayerNormalization", [x, skip, *self.ln_params(ln), *([bias] if bias else [])],
                  [out, "", "", residual],
                  domain=MS, epsilon=self.config.norm_eps)

    def make_attention_inputs(self) -> None:
        """seqlens_k = real tokens - 1 per row and total_sequence_length = the mask's width, as
        GroupQueryAttention takes them (int32)."""
        from onnx import TensorProto

        self.const("axis_1", np.array([1], np.int64))
        self.const("one", np.array(1, np.int64))
        self.node("ReduceSum", ["attention_mask", "axis_1"], ["mask_sum"], keepdims=0)
        self.node("Sub", ["mask_sum", "one"], ["seqlens_k_64"])
        self.node("Cast", ["seqlens_k_64"], ["seqlens_k"], to=TensorProto.INT32)
        self.node("Shape", ["attention_mask"], ["mask_shape"])
        self.node("Gather", ["mask_shape", "one"], ["total_length_64"], axis=0)
        self.node("Cast", ["total_length_64"], ["total_length"], to=TensorProto.INT32)

    def make_embeddings(self) -> None:
        """Token and position embeddings, added and normed by the first block's ln_1 (a llama: the token
        embedding, normed, and its rotary angles: tables of every position's for GroupQueryAttention, or
        those of `position_ids` for make_turned)."""
        if self.config.arch == "llama":
            self.node("Gather", [self.weight("wte", self.state["token_embedding.weight"]), "input_ids"], ["h.0.x"],
                      axis=0)
            if self.rotary_in_attention:
                self.make_rotary_tables()
                self.const("axis_last", np.array([-1], np.int64))  # make_rms_norm's (make_rotary's otherwise)
            else:
                self.make_rotary()
                c, D = self.config, self.config.head_dim
                self.const("qkv_split", np.array([c.num_heads * D, c.kv_heads * D, c.kv_heads * D], np.int64))
                for heads in {c.num_heads, c.kv_heads}:  # make_turned's shapes
                    self.const(f"heads_{heads}", np.array([0, 0, heads, D], np.int64))
                    self.const(f"width_{heads}", np.array([0, 0, heads * D], np.int64))
            self.make_rms_norm("h.0.x", "blocks.0.ln_1", "h.0.ln_1")  # the later ones fuse with the residual add
            return
        self.node("Gather", [self.weight("wte", self.state["token_embedding.weight"]), "input_ids"], ["tok"], axis=0)
        self.node("Gather", [self.weight("wpe", self.state["position_embedding.weight"]), "position_ids"], ["pos"],
                  axis=0)
        self.make_skip_layer_norm("tok", "pos", "blocks.0.ln_1", None, "h.0.ln_1", "h.0.x")

    def inv_freq(self) -> np.ndarray:
        """Pair d's turn per position, theta^(-2d/D), (D/2,) in float32 as gpt/model.py's Rotary has it."""
        D = self.config.head_dim
        return np.float32(1.0) / (np.float32(self.config.rope_theta) ** (np.arange(0, D, 2, dtype=np.float32) / D))

    def make_rotary_tables(self) -> None:
        """A llama's rotary angles for GroupQueryAttention to turn queries and keys by: `cos_cache` and
        `sin_cache` (block_size, D/2), row p the angles p · theta^(-2d/D) of pairs (d, d + D/2), in
        float32 as gpt/model.py's Rotary computes them. The op turns a call's token s by row
        seqlens_k + 1 - sequence_length + s: its position in a right-padded sequence, as `position_ids`
        holds it."""
        angles = np.arange(self.config.block_size, dtype=np.float32)[:, None] * self.inv_freq()  # (block_size, D/2)
        self.const("cos_cache", np.cos(angles).astype(self.np_dtype))
        self.const("sin_cache", np.sin(angles).astype(self.np_dtype))

    def make_rotary(self, heads_axis: int = 2) -> None:
        """A llama's rotary angles: `cos` and `sin` of position · theta^(-2d/D), each pair's angle twice
        (d and d + D/2), as gpt/model.py's Rotary makes them, once for every block: (B, T, 1, D) for
        this graph's (B, T, heads, D) queries and keys, (B, 1, T, D) with heads_axis 1 (the portable's)."""
        from onnx import TensorProto

        D = self.config.head_dim
        self.node("Cast", ["position_ids"], ["positions_f"], to=TensorProto.FLOAT)
        self.node("Unsqueeze", ["positions_f", self.const("axis_last", np.array([-1], np.int64))], ["positions_col"])
        self.node("Mul", ["positions_col", self.const("inv_freq", self.inv_freq())], ["half_angles"])
        self.node("Concat", ["half_angles", "half_angles"], ["angles"], axis=-1)  # (B, T, D)
        self.const("axis_2", np.array([2], np.int64))
        self.const("rotary_halves", np.array([D // 2, D // 2], np.int64))
        for f in ("Cos", "Sin"):
            self.node(f, ["angles"], [f"{f.lower()}_btd"])
            self.node("Unsqueeze", [f"{f.lower()}_btd", f"axis_{heads_axis}"], [f"{f.lower()}_f32"])
            if self.dtype == "float16":
                self.node("Cast", [f"{f.lower()}_f32"], [f.lower()], to=TensorProto.FLOAT16)
            else:
                self.node("Identity", [f"{f.lower()}_f32"], [f.lower()])

    def make_rms_norm(self, x: str, ln: str, out: str) -> None:
        """RMSNorm `ln` in standard ops: x / √(mean(x²) + eps) · w (opset 18's ReduceMean takes its axes
        as an input; 17's as an attribute)."""
        self.node("Mul", [x, x], [f"{out}.square"])
        if self.opset >= 18:
            self.node("ReduceMean", [f"{out}.square", "axis_last"], [f"{out}.mean_square"], keepdims=1)
        else:
            self.node("ReduceMean", [f"{out}.square"], [f"{out}.mean_square"], axes=[-1], keepdims=1)
        eps = self.const(f"{out}.eps", np.array(self.config.norm_eps, self.np_dtype))
        self.node("Add", [f"{out}.mean_square", eps], [f"{out}.variance"])
        self.node("Sqrt", [f"{out}.variance"], [f"{out}.rms"])
        self.node("Div", [x, f"{out}.rms"], [f"{out}.normed"])
        self.node("Mul", [f"{out}.normed", self.ln_params(ln)[0]], [out])

    def make_rotate(self, x: str, out: str) -> None:
        """x (its last axis a head's D) turned by its positions' angles: x·cos + (-x2, x1)·sin."""
        self.node("Split", [x, "rotary_halves"], [f"{x}.1", f"{x}.2"], axis=-1)
        self.node("Neg", [f"{x}.2"], [f"{x}.neg_2"])
        self.node("Concat", [f"{x}.neg_2", f"{x}.1"], [f"{x}.half_turned"], axis=-1)
        self.node("Mul", [x, "cos"], [f"{x}.cos"])
        self.node("Mul", [f"{x}.half_turned", "sin"], [f"{x}.sin"])
        self.node("Add", [f"{x}.cos", f"{x}.sin"], [out])

    def make_turned(self, x: str, heads: int, out: str) -> None:
        """x (B, T, heads·D) turned head by head: reshaped to (B, T, heads, D), rotated, reshaped back."""
        self.node("Reshape", [x, f"heads_{heads}"], [f"{x}.bthd"])
        self.make_rotate(f"{x}.bthd", f"{x}.turned")
        self.node("Reshape", [f"{x}.turned", f"width_{heads}"], [out])

    def make_attention(self, i: int) -> None:
        """Block i's attention: packed QKV → GroupQueryAttention (cache in place) → proj, + residual, ln_2.
        A llama's queries and keys are turned by the op (or, heads too narrow for it, split and turned
        first); its cache has K heads."""
        c, p, H = self.config, f"blocks.{i}", self.config.num_heads
        self.make_linear(f"h.{i}.ln_1", f"{p}.attn.qkv", f"h.{i}.qkv")
        qkv, rotary = [f"h.{i}.qkv", "", ""], {}
        if self.rotary_in_attention:
            qkv, rotary = [*qkv, "cos_cache", "sin_cache"], {"do_rotary": 1, "rotary_interleaved": 0}
        elif c.arch == "llama":
            self.node("Split", [f"h.{i}.qkv", "qkv_split"], [f"h.{i}.q", f"h.{i}.k", f"h.{i}.v"], axis=2)
            self.make_turned(f"h.{i}.q", H, f"h.{i}.q_turned")
            self.make_turned(f"h.{i}.k", c.kv_heads, f"h.{i}.k_turned")
            qkv = [f"h.{i}.q_turned", f"h.{i}.k_turned", f"h.{i}.v"]
        q, k, v, *tables = qkv
        self.node("GroupQueryAttention",
                  [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_length",
                   *tables],
                  [f"h.{i}.attn", f"present.{i}.key", f"present.{i}.value"], domain=MS, num_heads=H,
                  kv_num_heads=c.kv_heads, **rotary)
        bias = self.make_linear(f"h.{i}.attn", f"{p}.attn.proj", f"h.{i}.attn_out", bias_in_next=True)
        self.make_skip_layer_norm(f"h.{i}.attn_out", f"h.{i}.x", f"{p}.ln_2", bias, f"h.{i}.ln_2", f"h.{i}.x2")

    def make_mlp(self, i: int) -> None:
        """Block i's feed-forward: fc → FastGelu(+ bias) → proj, + residual, and the next LayerNorm
        (the next block's ln_1, or ln_f after the last block)."""
        p, last = f"blocks.{i}", i == self.config.num_layers - 1
        if self.config.arch == "llama":  # SwiGLU: proj(silu(gate(x)) · up(x)), silu(x) = x · sigmoid(x)
            self.make_linear(f"h.{i}.ln_2", f"{p}.mlp.gate", f"h.{i}.gate")
            self.make_linear(f"h.{i}.ln_2", f"{p}.mlp.up", f"h.{i}.up")
            self.node("Sigmoid", [f"h.{i}.gate"], [f"h.{i}.gate_sigmoid"])
            self.node("Mul", [f"h.{i}.gate", f"h.{i}.gate_sigmoid"], [f"h.{i}.silu"])
            self.node("Mul", [f"h.{i}.silu", f"h.{i}.up"], [f"h.{i}.gelu"])  # the name the next line reads
        else:
            bias = self.make_linear(f"h.{i}.ln_2", f"{p}.mlp.fc", f"h.{i}.fc", bias_in_next=True)
            self.node("FastGelu", [f"h.{i}.fc", *([bias] if bias else [])], [f"h.{i}.gelu"], domain=MS)
        bias = self.make_linear(f"h.{i}.gelu", f"{p}.mlp.proj", f"h.{i}.mlp_out", bias_in_next=True)
        self.make_skip_layer_norm(f"h.{i}.mlp_out", f"h.{i}.x2", "ln_f" if last else f"blocks.{i + 1}.ln_1", bias,
                                  "final" if last else f"h.{i + 1}.ln_1", "residual_out" if last else f"h.{i + 1}.x")

    def make_logits_to_keep(self, hidden: str) -> str:
        """The positions of `hidden` (B, T, C) the head reads: the last `logits_to_keep`, every one when 0
        (its default; serve.manifest.LOGITS_TO_KEEP). A prefill that needs the last position's logits
        alone skips the head's work on the others: at GPT-2's 50,257 tokens, a quarter of a 128-token
        prefill (`python bench/decode.py`)."""
        self.const(LOGITS_TO_KEEP, np.array([0], np.int64))
        self.const("keep_end", np.array([np.iinfo(np.int64).max], np.int64))
        self.const("sequence_axis", np.array([1], np.int64))
        self.node("Neg", [LOGITS_TO_KEEP], ["keep_start"])
        self.node("Slice", [hidden, "keep_start", "keep_end", "sequence_axis"], [f"{hidden}_kept"])
        return f"{hidden}_kept"

    def logits_to_keep_input(self):
        from onnx import TensorProto, helper

        return helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1])

    def make_head(self) -> None:
        """The LM head, with its own (transposed) copy even when tied, so quantization can treat it as any MatMul."""
        from onnx import TensorProto

        head = self.weight("lm_head.weight_t", self.state["lm_head.weight"].T)
        final = self.make_logits_to_keep("final")
        if self.dtype == "float16":
            self.node("MatMul", [final, head], ["logits_16"])
            self.node("Cast", ["logits_16"], ["logits"], to=TensorProto.FLOAT)
        else:
            self.node("MatMul", [final, head], ["logits"])

    # --- the whole graph ---------------------------------------------------------------------------

    def make_model(self):
        """Every piece in order, and the graph's inputs and outputs under the Optimum names."""
        from onnx import TensorProto, helper

        self.make_attention_inputs()
        self.make_embeddings()
        for i in range(self.config.num_layers):
            self.make_attention(i)
            self.make_mlp(i)
        self.make_head()
        L, K, D = self.config.num_layers, self.config.kv_heads, self.config.head_dim
        cache = ["batch", K, "max_sequence", D]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        inputs += [helper.make_tensor_value_info(n, self.elem, cache) for n in input_names(L)[3:]]
        inputs.append(self.logits_to_keep_input())
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "kept_sequence", self.config.vocab_size])]
        outputs += [helper.make_tensor_value_info(n, self.elem, cache) for n in output_names(L)[1:]]
        graph = helper.make_graph(self.nodes, "gpt_fused", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset),
                                                        helper.make_opsetid(MS, 1)], producer_name="gpt.export.fused")
        model.ir_version = 10
        return model


def build_fused(model, path: Path, opset: int = 18, dtype: str = "float32") -> dict:
    """Write the fused graph of `model` (a gpt.model.GPT) to `path`, its weights streamed to PATH.data
    as they are made (export.onnxfile.finish packs them in when they are small); returns {op: count}."""
    import onnx

    weights = WeightFile(path, external=True)  # streamed, then packed into one file when small enough
    builder = FusedBuilder(model, opset, dtype, weights)
    proto = builder.make_model()
    weights.close()
    onnx.save(proto, str(path))
    ops: dict[str, int] = {}
    for n in builder.nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops
