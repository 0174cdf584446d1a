"""The portable graph, written from the checkpoint: what the exporter would trace, without tracing.

`model.onnx` holds the model in standard ONNX ops (opset 17 and up), with the cache that grows by
Concat, exactly as `gpt/model.py` computes it:

    attention_mask, shapes ─► the additive mask (B, 1, T, P+T), built once, as gpt/model.py builds it
    ids, positions ─► Gather(token table) + Gather(position table)
    per block:
        LayerNormalization ─► MatMul(W_qkv) + b ─► Split ─► q, k, v as (B, H, T, D)
        k, v after the past (Concat) ─► present ─► softmax(q·kᵀ / √D + mask) · v ─► MatMul(W_proj) + b, + x
        LayerNormalization ─► MatMul(W_fc) + b ─► GELU (tanh) ─► MatMul(W_proj) + b, + x
    LayerNormalization (ln_f) ─► MatMul by the token table's Transpose (tied) or the head ─► logits

A llama (`arch: llama`) changes the pieces as gpt/model.py does: no position table, but the rotary
angles' cos and sin made once from position_ids (B, 1, T, D) and every block's q and k turned by them
(x·cos + rotate_half(x)·sin); RMSNorm as x / √(mean(x²) + eps) · w; SwiGLU as
MatMul(W_proj)(x_gate · Sigmoid(x_gate) · x_up); and grouped-query attention, whose cache holds the K
key/value heads, repeated to the H query heads (Expand, Reshape) for the scores.

It is what `torch.onnx.export` traces from the same model, about 40 nodes per block, written in a
few seconds at any size where the trace takes a minute at GPT-2 small (torch.export and onnxscript
walk every op in Python): the export's default (`--exporter builder`). Like onnxruntime-genai's model
builder, it knows this architecture only; the gates check it against PyTorch as they check a trace,
so a changed `gpt/model.py` fails the parity grid, and `--exporter dynamo` traces the code as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.fused import FusedBuilder
from export.onnxfile import WeightFile
from serve.manifest import input_names, output_names

MIN_OPSET = 17  # LayerNormalization


class PortableBuilder(FusedBuilder):
    """The fused builder's pieces (weights streamed to the data file, one `make_*` per piece), with
    standard ops in place of onnxruntime's fused ones."""

    def make_mask(self) -> None:
        """gpt/model.py's mask: key j is visible to query i (at position P+i) when j <= P+i and the
        attention_mask says it is real, and always its own slot; 0 where visible, float32's min elsewhere."""
        from onnx import TensorProto

        self.const("zero_i", np.array(0, np.int64))
        self.const("one_i", np.array(1, np.int64))
        self.const("axis_0", np.array([0], np.int64))
        self.const("axis_1", np.array([1], np.int64))
        self.const("axes_1_2", np.array([1, 2], np.int64))
        self.node("Shape", ["attention_mask"], ["mask_shape"])
        self.node("Gather", ["mask_shape", "one_i"], ["S"], axis=0)  # P + T
        self.node("Shape", ["input_ids"], ["ids_shape"])
        self.node("Gather", ["ids_shape", "one_i"], ["T"], axis=0)
        self.node("Sub", ["S", "T"], ["P"])
        self.node("Range", ["zero_i", "S", "one_i"], ["key_pos"])  # (S,)
        self.node("Range", ["P", "S", "one_i"], ["query_pos"])  # (T,)
        self.node("Unsqueeze", ["key_pos", "axis_0"], ["key_row"])  # (1, S)
        self.node("Unsqueeze", ["query_pos", "axis_1"], ["query_col"])  # (T, 1)
        self.node("LessOrEqual", ["key_row", "query_col"], ["causal"])  # (T, S)
        self.node("Equal", ["key_row", "query_col"], ["own"])  # (T, S)
        self.node("Cast", ["attention_mask"], ["real"], to=TensorProto.BOOL)  # (B, S)
        self.node("Unsqueeze", ["real", "axes_1_2"], ["real_keys"])  # (B, 1, 1, S)
        self.node("And", ["causal", "real_keys"], ["visible_real"])  # (B, 1, T, S)
        self.node("Or", ["visible_real", "own"], ["visible"])
        self.node("Where", ["visible", self.const("mask_open", np.array(0, np.float32)),
                            self.const("mask_shut", np.array(np.finfo(np.float32).min, np.float32))], ["mask"])

    def make_embeddings(self) -> None:
        """Token and position embeddings, added (dropout is off in inference); a llama's token embedding
        alone, its positions made into rotary angles (the fused builder's make_rotary)."""
        token = self.weight("token_embedding.weight", self.state["token_embedding.weight"])
        if self.config.arch == "llama":
            self.node("Gather", [token, "input_ids"], ["h.0.x"], axis=0)
            self.make_rotary(heads_axis=1)  # cos and sin (B, 1, T, D), for queries and keys of (B, heads, T, D)
            return
        self.node("Gather", [token, "input_ids"], ["tok"], axis=0)
        self.node("Gather", [self.weight("position_embedding.weight", self.state["position_embedding.weight"]),
                             "position_ids"], ["pos"], axis=0)
        self.node("Add", ["tok", "pos"], ["h.0.x"])

    def make_layer_norm(self, x: str, ln: str, out: str) -> None:
        """LayerNorm `ln` (gpt2), or RMSNorm (llama): x / √(mean(x²) + eps) · w."""
        if self.config.arch == "llama":
            self.make_rms_norm(x, ln, out)
            return
        params = [p for p in self.ln_params(ln) if p]  # no bias: the input left out, not named ""
        self.node("LayerNormalization", [x, *params], [out], axis=-1, epsilon=self.config.norm_eps)

    def make_attention(self, i: int) -> None:
        """Block i's attention, with the cache concatenated: present = past followed by this call's."""
        c, p, h = self.config, f"blocks.{i}", f"h.{i}"
        self.make_layer_norm(f"{h}.x", f"{p}.ln_1", f"{h}.ln_1")
        self.make_linear(f"{h}.ln_1", f"{p}.attn.qkv", f"{h}.qkv")
        self.node("Split", [f"{h}.qkv", "qkv_split"], [f"{h}.q", f"{h}.k", f"{h}.v"], axis=2)
        for part, shape in (("q", "heads_shape"), ("k", "kv_heads_shape"), ("v", "kv_heads_shape")):
            self.node("Reshape", [f"{h}.{part}", shape], [f"{h}.{part}_bthd"])
            self.node("Transpose", [f"{h}.{part}_bthd"], [f"{h}.{part}_h"], perm=[0, 2, 1, 3])  # (B, H or K, T, D)
        q, k = f"{h}.q_h", f"{h}.k_h"
        if c.arch == "llama":
            self.make_rotate(q, f"{h}.q_turned")
            self.make_rotate(k, f"{h}.k_turned")
            q, k = f"{h}.q_turned", f"{h}.k_turned"
        self.node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2)
        self.node("Concat", [f"past_key_values.{i}.value", f"{h}.v_h"], [f"present.{i}.value"], axis=2)
        keys, values = self.make_repeat_kv(f"present.{i}.key"), self.make_repeat_kv(f"present.{i}.value")
        self.node("Transpose", [keys], [f"{h}.k_t"], perm=[0, 1, 3, 2])  # (B, H, D, P+T)
        self.node("MatMul", [q, f"{h}.k_t"], [f"{h}.qk"])
        self.node("Mul", [f"{h}.qk", self.const(f"{h}.scale", np.array(1 / np.sqrt(c.head_dim), np.float32))],
                  [f"{h}.scores"])
        self.node("Add", [f"{h}.scores", "mask"], [f"{h}.masked"])
        self.node("Softmax", [f"{h}.masked"], [f"{h}.weights"], axis=-1)
        self.node("MatMul", [f"{h}.weights", values], [f"{h}.y_h"])  # (B, H, T, D)
        self.node("Transpose", [f"{h}.y_h"], [f"{h}.y_bthd"], perm=[0, 2, 1, 3])
        self.node("Reshape", [f"{h}.y_bthd", "width_shape"], [f"{h}.y"])  # (B, T, C)
        self.make_linear(f"{h}.y", f"{p}.attn.proj", f"{h}.attn_out")
        self.node("Add", [f"{h}.x", f"{h}.attn_out"], [f"{h}.x2"])

    def make_repeat_kv(self, cache: str) -> str:
        """Grouped-query attention: the cache's K heads (B, K, S, D), each repeated for its H / K query
        heads into (B, H, S, D), as repeat_interleave does in gpt/model.py; the cache itself without."""
        c = self.config
        if c.kv_heads == c.num_heads:
            return cache
        self.node("Unsqueeze", [cache, "axis_2"], [f"{cache}.grouped"])  # (B, K, 1, S, D)
        self.node("Expand", [f"{cache}.grouped", "group_shape"], [f"{cache}.expanded"])  # (B, K, H/K, S, D)
        self.node("Reshape", [f"{cache}.expanded", "repeated_shape"], [f"{cache}.repeated"])  # (B, H, S, D)
        return f"{cache}.repeated"

    def make_mlp(self, i: int) -> None:
        """Block i's feed-forward, GELU in its tanh form: x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)));
        a llama's SwiGLU: proj(silu(gate(x)) · up(x)), silu(x) = x · sigmoid(x)."""
        p, h = f"blocks.{i}", f"h.{i}"
        self.make_layer_norm(f"{h}.x2", f"{p}.ln_2", f"{h}.ln_2")
        if self.config.arch == "llama":
            self.make_linear(f"{h}.ln_2", f"{p}.mlp.gate", f"{h}.gate")
            self.make_linear(f"{h}.ln_2", f"{p}.mlp.up", f"{h}.up")
            self.node("Sigmoid", [f"{h}.gate"], [f"{h}.gate_sigmoid"])
            self.node("Mul", [f"{h}.gate", f"{h}.gate_sigmoid"], [f"{h}.silu"])
            self.node("Mul", [f"{h}.silu", f"{h}.up"], [f"{h}.gated"])
            self.make_linear(f"{h}.gated", f"{p}.mlp.proj", f"{h}.mlp_out")
            self.node("Add", [f"{h}.x2", f"{h}.mlp_out"], [f"h.{i + 1}.x"])
            return
        self.make_linear(f"{h}.ln_2", f"{p}.mlp.fc", f"{h}.fc")
        self.node("Pow", [f"{h}.fc", "three"], [f"{h}.cube"])
        self.node("Mul", [f"{h}.cube", "gelu_c"], [f"{h}.cube_c"])
        self.node("Add", [f"{h}.fc", f"{h}.cube_c"], [f"{h}.inner"])
        self.node("Mul", [f"{h}.inner", "sqrt_2_pi"], [f"{h}.inner_s"])
        self.node("Tanh", [f"{h}.inner_s"], [f"{h}.tanh"])
        self.node("Add", [f"{h}.tanh", "one_f"], [f"{h}.tanh_1"])
        self.node("Mul", [f"{h}.fc", f"{h}.tanh_1"], [f"{h}.gelu_2"])
        self.node("Mul", [f"{h}.gelu_2", "half"], [f"{h}.gelu"])
        self.make_linear(f"{h}.gelu", f"{p}.mlp.proj", f"{h}.mlp_out")
        self.node("Add", [f"{h}.x2", f"{h}.mlp_out"], [f"h.{i + 1}.x"])

    def make_head(self) -> None:
        """ln_f, then the LM head: a tied model multiplies by the token table's Transpose (one copy of
        the table, as in the model); an untied one by its own (transposed) weight."""
        last = f"h.{self.config.num_layers}.x"
        self.make_layer_norm(last, "ln_f", "final")
        final = self.make_logits_to_keep("final")
        if self.config.tie_embeddings:
            self.node("Transpose", ["token_embedding.weight"], ["lm_head.weight_t"], perm=[1, 0])
            head = "lm_head.weight_t"
        else:
            head = self.weight("lm_head.weight_t", self.state["lm_head.weight"].T)
        self.node("MatMul", [final, head], ["logits"])

    def make_model(self):
        """Every piece in order, under the Optimum names, the cache's length named as a trace names it."""
        from onnx import TensorProto, helper

        c = self.config
        C, H, K, D, L = c.embedding_dim, c.num_heads, c.kv_heads, c.head_dim, c.num_layers
        self.const("qkv_split", np.array([H * D, K * D, K * D], np.int64))
        self.const("heads_shape", np.array([0, 0, H, D], np.int64))
        self.const("kv_heads_shape", np.array([0, 0, K, D], np.int64))
        self.const("width_shape", np.array([0, 0, C], np.int64))
        self.const("group_shape", np.array([1, 1, H // K, 1, 1], np.int64))
        self.const("repeated_shape", np.array([0, H, -1, D], np.int64))
        for name, value in (("three", 3.0), ("gelu_c", 0.044715), ("sqrt_2_pi", np.sqrt(2 / np.pi)), ("one_f", 1.0),
                            ("half", 0.5)):
            self.const(name, np.array(value, np.float32))
        self.make_mask()
        self.make_embeddings()
        for i in range(L):
            self.make_attention(i)
            self.make_mlp(i)
        self.make_head()
        total = "past_sequence + sequence"
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", total]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", K, "past_sequence", D])
                   for n in input_names(L)[3:]]
        inputs.append(self.logits_to_keep_input())
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "kept_sequence", c.vocab_size])]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", K, total, D])
                    for n in output_names(L)[1:]]
        graph = helper.make_graph(self.nodes, "gpt", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="gpt.export.portable")
        model.ir_version = 10
        return model


def build_portable(model, path: Path, opset: int = 18) -> None:
    """Write the portable graph of `model` (a gpt.model.GPT) to `path`, its weights streamed to
    PATH.data as they are made (export.onnxfile.finish packs them in when they are small)."""
    import onnx

    weights = WeightFile(path, external=True)
    proto = PortableBuilder(model, opset, "float32", weights).make_model()
    weights.close()
    onnx.save(proto, str(path))
