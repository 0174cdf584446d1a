"""`python -m export RUN DIR --format gguf`: the model for llama.cpp (and ollama, LM Studio, llama-cpp-python).

Written from the checkpoint with the `gguf` package (ggml's own writer), in the layout of llama.cpp's
`gpt2` architecture, which is this model's (LLM_ARCH_GPT2 in llama.cpp; convert_hf_to_gguf.py's GPT2Model):

    the toolkit                          GGUF tensor (llama.cpp)
    token_embedding / position_embedding token_embd.weight / position_embd.weight
    blocks.{i}.ln_1, ln_2                blk.{i}.attn_norm, blk.{i}.ffn_norm (.weight, .bias)
    blocks.{i}.attn.qkv                  blk.{i}.attn_qkv (fused, as ours: q, k, v stacked)
    blocks.{i}.attn.proj                 blk.{i}.attn_output
    blocks.{i}.mlp.fc, mlp.proj          blk.{i}.ffn_up, blk.{i}.ffn_down
    ln_f                                 output_norm
    lm_head (untied only)                output.weight (llama.cpp reads token_embd when it is absent)

nn.Linear's (out, in) weight is ggml's row-major (ne0 = in) as it is: no transpose.

A llama (`arch: llama`) is written as llama.cpp's `llama` architecture (convert_hf_to_gguf.py's
LlamaModel): attn_norm and ffn_norm are RMSNorm gains, our fused qkv is split into attn_q, attn_k and
attn_v, and mlp.gate, up, proj are ffn_gate, ffn_up, ffn_down. llama.cpp turns adjacent pairs of a
head's dimensions (d, d + 1) where transformers and gpt/model.py turn (d, d + D/2), so the rows of
attn_q and attn_k are permuted per head, as the converter does; the model is the same function.

The tokenizer goes in the file, as tokenizer.ggml.model "gpt2":
- byte-level BPE: its tokens (byte-level strings) and merges, <|endoftext|> as the end-of-text token;
- a character vocabulary: each character as the byte-level string of its UTF-8 bytes, so llama.cpp's
  byte-level BPE turns each character into its token; plus one merge that can never apply (two 0xFF
  bytes, which UTF-8 text never holds), since llama.cpp refuses a BPE vocabulary without merges.
  Characters of more than one byte (non-ASCII) would need merges, so such a vocabulary is refused.

Types (--gguf-type): f32, f16, and gguf-py's quantizers q8_0, q5_0, q5_1, q4_0, q4_1 (blocks of 32
along each row; llama.cpp runs all of them on the CPU for gpt2). Matrices are quantized, LayerNorm
gains and biases stay f32, as llama.cpp's own quantizer leaves them. For k-quants (q4_k_m, q6_k ...)
run llama.cpp's `llama-quantize` on the f32 or f16 file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.destination import GGUF_FORMAT, GGUF_REPORT, check_destination, publish
from gpt.checkpoint import load_checkpoint, resolve_checkpoint
from gpt.files import staging
from gpt.tokenizer import CharTokenizer, char_as_byte_level
from serve.manifest import ExportError

GGUF_TYPES = ("f32", "f16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
NEVER_MERGED = ("ÿ", "ÿ")  # byte 0xFF in byte-level form: UTF-8 text never holds it, so the merge never applies


def tensor_names(model) -> dict[str, str]:
    """Our state-dict names -> llama.cpp's gpt2 tensor names."""
    names = {"token_embedding.weight": "token_embd.weight", "position_embedding.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    if not model.config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.proj": "attn_output", "mlp.proj": "ffn_down"}
    if model.config.arch == "llama":  # its qkv goes apart (gguf_tensors)
        parts |= {"mlp.gate": "ffn_gate", "mlp.up": "ffn_up"}
    else:
        parts |= {"attn.qkv": "attn_qkv", "mlp.fc": "ffn_up"}
    for i in range(model.config.num_layers):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    return names


def pairs_adjacent(rows: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection's rows, per head, from rotate-half order (pairs d, d + D/2) to llama.cpp's
    adjacent pairs (2d, 2d + 1): convert_hf_to_gguf.py's LlamaModel.permute."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp's tensors of `model`, by name: ours renamed, a llama's qkv split and its q and k permuted."""
    c = model.config
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tensors = {theirs: state[ours] for ours, theirs in tensor_names(model).items() if ours in state}
    if c.arch == "llama":
        sizes = np.cumsum([c.num_heads * c.head_dim, c.kv_heads * c.head_dim])
        for i in range(c.num_layers):
            for kind in ("weight", "bias"):
                if f"blocks.{i}.attn.qkv.{kind}" in state:
                    q, k, v = np.split(state[f"blocks.{i}.attn.qkv.{kind}"], sizes)
                    tensors |= {f"blk.{i}.attn_q.{kind}": pairs_adjacent(q, c.num_heads),
                                f"blk.{i}.attn_k.{kind}": pairs_adjacent(k, c.kv_heads), f"blk.{i}.attn_v.{kind}": v}
    return tensors


def vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for tokenizer.ggml.*: 1 normal, 3 control (<|endoftext|>, a chat
    template's markers)."""
    if isinstance(tokenizer, CharTokenizer):
        try:
            tokens = char_as_byte_level(tokenizer)
        except ValueError as e:
            raise ExportError(str(e)) from None
        specials = tokenizer.special_tokens
        # llama.cpp refuses a BPE without merges
        return tokens + specials, [1] * len(tokens) + [3] * len(specials), [" ".join(NEVER_MERGED)]
    data = json.loads(tokenizer.to_json())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    for added in data.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens.extend([""] * (added["id"] + 1 - len(tokens)))
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    control = {tokenizer.eot_id} | {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    types = [3 if i in control else 1 for i in range(len(tokens))]
    return tokens, types, merges


def write_gguf(model, tokenizer, path: Path, gguf_type: str, description: str) -> dict:
    """One GGUF file of `model` in `gguf_type`; returns {tensor name: ggml type name}."""
    import gguf

    c = model.config
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             **{t: getattr(gguf.GGMLQuantizationType, t.upper()) for t in GGUF_TYPES[2:]}}[gguf_type]
    writer = gguf.GGUFWriter(str(path), "llama" if c.arch == "llama" else "gpt2")
    writer.add_name(description.split(":")[0])
    writer.add_description(description)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.embedding_dim)
    writer.add_feed_forward_length(c.mlp_dim)
    writer.add_block_count(c.num_layers)
    writer.add_head_count(c.num_heads)
    if c.arch == "llama":
        writer.add_head_count_kv(c.kv_heads)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_vocab_size(c.vocab_size)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
    writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}[gguf_type])
    tokens, types, merges = vocabulary(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokenizer.eot_id
    if tokenizer.chat is not None:  # llama.cpp's chat completion renders this template, and stops at the turn's end
        eos = tokenizer.token_id(tokenizer.chat.eos_token)
        writer.add_chat_template(tokenizer.chat.template)
        writer.add_eot_token_id(eos)
    if tokenizer.eot_id is not None:
        writer.add_bos_token_id(tokenizer.eot_id)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    written = {}
    for theirs, array in gguf_tensors(model).items():
        kind = qtype if array.ndim == 2 and array.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(theirs, array.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(theirs, np.ascontiguousarray(array, dtype=np.float32))
        else:
            writer.add_tensor(theirs, gguf.quants.quantize(array, kind), raw_dtype=kind)
        written[theirs] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def export_gguf(source: str | Path, export_dir: str | Path, *, types: list[str], force: bool = False,
                checkpoint: str = "best", log: Callable[[str], None] = print) -> dict:
    """Write EXPORT_DIR/model.TYPE.gguf for each type, a Modelfile for ollama and export_report.json."""
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise ExportError(f"--gguf-type {','.join(unknown) or '(none)'} is not one of {', '.join(GGUF_TYPES)}")
    export_dir = Path(export_dir)
    which = checkpoint
    folder = resolve_checkpoint(source, which)
    check_destination(export_dir, folder, force, kind="gguf")
    model, tokenizer, meta = load_checkpoint(folder)
    model.float().eval()
    bad = [n for n, p in model.state_dict().items() if p.dim() == 2 and p.shape[-1] % 32 and n != "lm_head.weight"]
    quantized = [t for t in types if t.startswith("q")]
    if quantized and bad:
        raise ExportError(f"{', '.join(quantized)} quantize rows in blocks of 32 and {bad[0]} has rows of "
                          f"{model.state_dict()[bad[0]].shape[-1]}: use --gguf-type f32 or f16")
    description = f"gpt: {folder.parent.parent.name if folder.parent.name == 'checkpoints' else folder.name}, " \
                  f"checkpoint {folder.name} (step {meta.get('step')}, {tokenizer.kind} tokenizer)"
    files = {}
    with staging(export_dir) as tmp:
        for t in types:
            name = f"model.{t}.gguf"
            write_gguf(model, tokenizer, tmp / name, t, description)
            files[t] = {"file": name, "bytes": (tmp / name).stat().st_size}
            log(f"wrote {name} ({files[t]['bytes'] / 2**20:.1f} MiB)")
        best = files[types[-1]]["file"]
        (tmp / "Modelfile").write_text(modelfile(best, tokenizer, model.config.block_size))
        report = {"format": GGUF_FORMAT, "files": files, "description": description,
                  "source": {"checkpoint": str(folder), "step": meta.get("step"), "selected": which}}
        (tmp / GGUF_REPORT).write_text(json.dumps(report, indent=2))
        publish(tmp, export_dir, folder, force, kind="gguf")
    return report


def modelfile(gguf_name: str, tokenizer, block_size: int) -> str:
    """An ollama Modelfile for the file: raw completion (no chat template), the model's context."""
    stop = 'PARAMETER stop "<|endoftext|>"\n' if tokenizer.eot_id is not None else ""
    return (f"# ollama create NAME -f Modelfile, then: ollama run NAME 'ROMEO:'\nFROM ./{gguf_name}\n"
            f'TEMPLATE "{{{{ .Prompt }}}}"\nPARAMETER num_ctx {block_size}\n{stop}')
