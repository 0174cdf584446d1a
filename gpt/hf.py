"""Hugging Face GPT-2 and Llama in and out: a transformers `GPT2LMHeadModel` or `LlamaForCausalLM`
folder to the toolkit's model, and back.

With biases on, the toolkit's model is GPT-2's architecture: pre-LayerNorm blocks (eps 1e-5), GELU
(tanh), learned positions, one fused QKV projection, attention scaled by 1/sqrt(head_dim). So the
weights map one to one, with one twist: GPT-2 stores its projections as `Conv1D` weights, (in, out),
the transpose of `nn.Linear`'s (out, in).

    gpt2 (transformers)                   the toolkit
    transformer.wte / wpe                 token_embedding / position_embedding
    transformer.h.{i}.ln_1, ln_2          blocks.{i}.ln_1, ln_2
    transformer.h.{i}.attn.c_attn (C,3C)  blocks.{i}.attn.qkv (3C,C), transposed
    transformer.h.{i}.attn.c_proj         blocks.{i}.attn.proj, transposed
    transformer.h.{i}.mlp.c_fc, c_proj    blocks.{i}.mlp.fc, proj, transposed
    transformer.ln_f                      ln_f
    lm_head (tied to wte)                 lm_head (tied: model.tie_embeddings=true, kept as GPT-2 has it)

A Llama (`arch: llama`) maps as plainly; its q, k and v projections are one fused `qkv` here:

    llama (transformers)                             the toolkit
    model.embed_tokens                               token_embedding
    model.layers.{i}.input_layernorm                 blocks.{i}.ln_1 (RMSNorm)
    model.layers.{i}.self_attn.q_proj, k_proj, v_proj blocks.{i}.attn.qkv, rows stacked (H·D + 2·K·D, C)
    model.layers.{i}.self_attn.o_proj                blocks.{i}.attn.proj
    model.layers.{i}.post_attention_layernorm        blocks.{i}.ln_2
    model.layers.{i}.mlp.gate_proj, up_proj, down_proj  blocks.{i}.mlp.gate, up, proj
    model.norm, lm_head                              ln_f, lm_head (or tied to embed_tokens)

Only safetensors weights are read (a folder with only pytorch_model.bin, a pickle, is refused), and
transformers itself is not needed here: it is used, when installed, only to check the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gpt.chat import write_chat_fields
from gpt.config import ModelConfig
from gpt.files import save_safetensors
from gpt.model import GPT
from gpt.tokenizer import EOT, BPETokenizer, Tokenizer, byte_level_twin, load_tokenizer, stop_ids

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)
OURS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
        "ln_1": "ln_1", "ln_2": "ln_2"}


class HFError(ValueError):
    """A folder that cannot be imported or written. The message names the file and the fix."""


def resolve_folder(spec: str) -> Path:
    """hf:PATH (a local folder) or hf:NAME (a Hub model, fetched with huggingface_hub where it can be)."""
    name = spec.removeprefix("hf:")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise HFError(f"model.init_from={spec}: {path} is not a folder: give a transformers GPT-2 folder "
                      f"({', '.join(HF_FILES)})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFError(f"model.init_from={spec}: no folder {path} here, and fetching {name!r} from the Hub needs "
                      "huggingface_hub (pip install huggingface_hub), or download the folder yourself") from None
    try:
        return Path(snapshot_download(name, allow_patterns=list(HF_FILES)))
    except Exception as e:  # network, auth, unknown repository
        raise HFError(f"model.init_from={spec}: could not fetch {name!r} from the Hub ({type(e).__name__}); "
                      f"download {', '.join(HF_FILES)} into a folder and pass hf:FOLDER") from None


def read_config(folder: Path) -> ModelConfig:
    """The toolkit's ModelConfig for a GPT-2 folder, refusing anything that is not GPT-2's architecture."""
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{path} is missing: a transformers model folder has config.json, model.safetensors and "
                      "tokenizer.json")
    try:
        c = json.loads(path.read_text())
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None
    if c.get("model_type") == "llama":
        return read_llama_config(path, c)
    if c.get("model_type") != "gpt2":
        raise HFError(f"{path} is model_type {c.get('model_type')!r}; only 'gpt2' (GPT2LMHeadModel) and 'llama' "
                      "(LlamaForCausalLM) can be imported")
    unsupported = [f"{k}={c.get(k)!r}" for k, ok in (
        ("activation_function", c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", c.get("n_inner") in (None, 4 * c.get("n_embd", 0))),
        ("scale_attn_weights", c.get("scale_attn_weights", True) is True),
        ("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx", False)),
        ("reorder_and_upcast_attn", not c.get("reorder_and_upcast_attn", False)),
        ("layer_norm_epsilon", c.get("layer_norm_epsilon", 1e-5) == 1e-5),
        ("add_cross_attention", not c.get("add_cross_attention", False))) if not ok]
    if unsupported:
        raise HFError(f"{path}: {', '.join(unsupported)} differ from GPT-2's architecture, which is all this imports")
    return ModelConfig(block_size=c["n_positions"], embedding_dim=c["n_embd"], num_heads=c["n_head"],
                       num_layers=c["n_layer"], vocab_size=c["vocab_size"], bias=True,
                       tie_embeddings=c.get("tie_word_embeddings", True))


def read_llama_config(path: Path, c: dict) -> ModelConfig:
    """A LlamaForCausalLM config.json as a ModelConfig (arch llama), refusing what the model does not
    implement (rope scaling, other activations, a head_dim of its own, biases on one side only)."""
    heads = c.get("num_attention_heads", 0)
    head_dim = c.get("head_dim") or (c.get("hidden_size", 0) // max(heads, 1))
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    unsupported = [f"{k}={v!r}" for k, v, ok in (
        ("hidden_act", c.get("hidden_act", "silu"), c.get("hidden_act", "silu") == "silu"),
        ("rope_scaling", rope, rope_type == "default"),
        ("head_dim", c.get("head_dim"), head_dim * heads == c.get("hidden_size")),
        ("mlp_bias", c.get("mlp_bias", False), c.get("mlp_bias", False) == c.get("attention_bias", False)),
    ) if not ok]
    if unsupported:
        raise HFError(f"{path}: {', '.join(unsupported)} is not supported; this imports Llama with SiLU, default "
                      "rotary (no scaling), head_dim = hidden_size / num_attention_heads, and biases on all or none")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0)
    config = ModelConfig(arch="llama", block_size=c["max_position_embeddings"], embedding_dim=c["hidden_size"],
                         num_heads=heads, num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                         num_kv_heads=c.get("num_key_value_heads") or heads,
                         intermediate_size=c["intermediate_size"], rope_theta=float(theta),
                         norm_eps=float(c.get("rms_norm_eps", 1e-6)), bias=bool(c.get("attention_bias", False)),
                         tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    problems = config.problems()
    if problems:
        raise HFError(f"{path}: {'; '.join(problems)}")
    return config


def read_tokenizer(folder: Path, vocab_size: int) -> BPETokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise HFError(f"{path} is missing: the model's tokenizer is needed (transformers writes it with "
                      "tokenizer.save_pretrained)")
    tokenizer = load_tokenizer(path)
    if not isinstance(tokenizer, BPETokenizer):
        raise HFError(f"{path} is not a Hugging Face tokenizers file")
    if tokenizer.vocab_size != vocab_size:
        raise HFError(f"{path} has {tokenizer.vocab_size} tokens but the weights have {vocab_size}: the folder mixes "
                      "two models")
    return tokenizer


def weights_path(folder: Path) -> Path:
    path = folder / "model.safetensors"
    if not path.is_file():
        pickle = " (it has pytorch_model.bin, a pickle, which is never loaded: save it as safetensors)" if (
            folder / "pytorch_model.bin").is_file() else ""
        raise HFError(f"{path} is missing{pickle}")
    return path


def import_hf(folder: Path, config: ModelConfig | None = None) -> GPT:
    """The toolkit's model with a GPT-2 or Llama folder's weights (config: read_config's, perhaps with
    dropout or block_size set)."""
    config = config or read_config(folder)
    path = weights_path(folder)
    hf = load_file(str(path))
    model = GPT(config)
    state = llama_state(hf, path) if config.arch == "llama" else gpt2_state(hf, path)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFError(f"{path} does not fit its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


LLAMA_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.proj",
               "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.proj"}
LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def llama_state(hf: dict, path: Path) -> dict:
    """A LlamaForCausalLM state dict in the toolkit's names, q, k and v stacked into one qkv."""
    state, qkv = {}, {}
    for name, tensor in hf.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            state[{"model.embed_tokens.weight": "token_embedding.weight", "model.norm.weight": "ln_f.weight"}.get(
                name, name)] = tensor
            continue
        parts = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if parts[:2] != ["model", "layers"] or len(parts) < 5 or module not in (*LLAMA_LAYER, *LLAMA_QKV):
            raise HFError(f"{path} holds {name!r}, which a Llama does not have")
        if module in LLAMA_QKV:
            qkv.setdefault((parts[2], kind), {})[module] = tensor
        else:
            state[f"blocks.{parts[2]}.{LLAMA_LAYER[module]}.{kind}"] = tensor
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise HFError(f"{path}: layer {i} lacks {sorted(set(LLAMA_QKV) - set(parts))}")
        state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[m] for m in LLAMA_QKV])
    return state


def gpt2_state(hf: dict, path: Path) -> dict:
    """A GPT2LMHeadModel state dict in the toolkit's names, Conv1D weights transposed."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf) else ""
    state = {}
    for name, tensor in hf.items():
        key = name.removeprefix(prefix)
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        if key == "lm_head.weight" or name == "lm_head.weight":
            state["lm_head.weight"] = tensor
            continue
        if key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            ours = {"wte.weight": "token_embedding.weight", "wpe.weight": "position_embedding.weight"}.get(key, key)
            state[ours] = tensor
            continue
        parts = key.split(".")  # h.{i}.{module}.{weight|bias}
        if parts[0] != "h" or len(parts) < 4:
            raise HFError(f"{path} holds {name!r}, which GPT-2 does not have")
        module, kind = ".".join(parts[2:-1]), parts[-1]
        if module not in OURS:
            raise HFError(f"{path} holds {name!r}, which GPT-2 does not have")
        state[f"blocks.{parts[1]}.{OURS[module]}.{kind}"] = tensor.t() if module in CONV1D and kind == "weight" \
            else tensor
    return state


def export_hf_folder(model: GPT, tokenizer: Tokenizer, folder: Path) -> None:
    """Write `folder` as transformers writes a GPT2LMHeadModel (arch gpt2) or a LlamaForCausalLM (arch
    llama): config.json, model.safetensors, the tokenizer."""
    c = model.config
    chat = tokenizer.chat
    if not isinstance(tokenizer, BPETokenizer):  # a char vocabulary, as the byte-level BPE giving the same ids
        try:
            tokenizer = byte_level_twin(tokenizer)
        except ValueError as e:
            raise HFError(str(e)) from None
    eot = tokenizer.eot_id
    state, config = llama_folder(model) if c.arch == "llama" else gpt2_folder(model)
    config |= {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
               "initializer_range": 0.02, "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32"}
    if not c.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, folder / "model.safetensors",
                     metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(folder / "tokenizer.json")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    write_chat_fields(folder, chat, {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": c.block_size,
                                     "add_prefix_space": False, **special})
    if chat is not None:  # generate() stops at the end of the assistant's turn too
        stops = sorted(stop_ids(tokenizer))
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eot, "eos_token_id": stops if len(stops) > 1 else stops[0]}, indent=2))


def gpt2_folder(model: GPT) -> tuple[dict, dict]:
    """GPT2LMHeadModel's state dict (Conv1D weights transposed) and config.json."""
    c = model.config
    if not c.bias:
        raise HFError("GPT-2 has biases everywhere: a model trained with model.bias=false cannot be written as GPT-2")
    state = {"transformer.wte.weight": model.token_embedding.weight, "transformer.wpe.weight":
             model.position_embedding.weight, "transformer.ln_f.weight": model.ln_f.weight,
             "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        for hf_name, ours in OURS.items():
            module = block.get_submodule(ours)
            weight = module.weight.t() if hf_name in CONV1D else module.weight
            state[f"transformer.h.{i}.{hf_name}.weight"] = weight
            state[f"transformer.h.{i}.{hf_name}.bias"] = module.bias
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.block_size,
              "n_embd": c.embedding_dim, "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout,
              "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "scale_attn_weights": True}
    return state, config


def llama_folder(model: GPT) -> tuple[dict, dict]:
    """LlamaForCausalLM's state dict (our qkv split into q, k and v) and config.json."""
    c = model.config
    state = {"model.embed_tokens.weight": model.token_embedding.weight, "model.norm.weight": model.ln_f.weight}
    ours = {v: k for k, v in LLAMA_LAYER.items()}
    sizes = [c.num_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    for i, block in enumerate(model.blocks):
        for name, tensor in block.named_parameters():
            module, kind = name.rsplit(".", 1)
            if module == "attn.qkv":
                for part, piece in zip(LLAMA_QKV, tensor.split(sizes)):
                    state[f"model.layers.{i}.{part}.{kind}"] = piece
            else:
                state[f"model.layers.{i}.{ours[module]}.{kind}"] = tensor
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": c.block_size,
              "hidden_size": c.embedding_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "intermediate_size": c.mlp_dim,
              "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
              "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout, "pretraining_tp": 1}
    return state, config


@torch.no_grad()
def parity_with_transformers(model: GPT, folder: Path, tokens: int = 100) -> dict:
    """Logits against transformers' GPT2LMHeadModel or LlamaForCausalLM on the same folder, and greedy
    decoding: the check of an import or an export. Needs transformers; says so when it is missing."""
    try:
        from transformers import GPT2LMHeadModel, LlamaForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return {"checked": False, "note": "transformers is not installed (pip install -e '.[hf]'): not compared"}
    hf_logging.set_verbosity_error()
    kind = LlamaForCausalLM if model.config.arch == "llama" else GPT2LMHeadModel
    reference, info = kind.from_pretrained(str(folder), output_loading_info=True)
    reference = reference.float().eval()
    model = model.float().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, min(24, model.config.block_size)), generator=g)
    ours, theirs = model(ids).logits, reference(ids).logits
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    n = min(tokens, model.config.block_size - 8)
    prompt = ids[:1, :8]
    # n tokens with no end token (ours does not stop either): min_new_tokens would instead forbid the end
    # token, and an argmax that is the end token would then differ
    reference.generation_config.eos_token_id = None
    # the mask said outright: transformers would otherwise take every id equal to pad_token_id for padding
    hf_greedy = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                   pad_token_id=0)[0, 8:].tolist()
    from gpt.generate import generate
    from gpt.sampling import SamplingParams

    our_greedy = list(generate(model, prompt[0].tolist(), n, SamplingParams(greedy=True)))
    loading = {k: list(v) for k, v in info.items() if v}
    return {"checked": True, "max_rel_logit_error": rel, "tolerance": 1e-5, "passed": rel <= 1e-5,
            "greedy_tokens": n, "greedy_identical": hf_greedy == our_greedy, "loading_problems": loading}
