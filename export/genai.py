"""onnxruntime-genai's view of an export folder: genai_config.json and tokenizer_config.json, so that
`onnxruntime_genai.Model(EXPORT_DIR)` runs the folder as it is."""

from __future__ import annotations

import json
from pathlib import Path

from gpt.chat import write_chat_fields
from gpt.tokenizer import EOT, stop_ids
from serve.manifest import VARIANTS


def genai_config(manifest: dict, variant: str, eot_id: int | None) -> dict:
    """onnxruntime-genai's config for one model file of an export folder: model type `decoder`, the
    Optimum input and output names; a shared-cache (fused) graph gets past and present in one buffer,
    which GroupQueryAttention writes in place."""
    c = manifest["model"]
    shared = manifest.get("graphs", {}).get(variant, {}).get("cache") == "shared"
    names = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "type": "llama" if c.get("arch") == "llama" else "decoder", "vocab_size": c["vocab_size"],
            "context_length": c["block_size"],
            "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id,
            "decoder": {
                "filename": manifest["files"][variant],
                # errors only: onnxruntime warns at every load that logits_to_keep, an input with a
                # default, is no constant (it is meant not to be; genai leaves it at every position)
                "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
                "hidden_size": c["embedding_dim"], "head_size": c["embedding_dim"] // c["num_heads"],
                "num_attention_heads": c["num_heads"], "num_key_value_heads": c.get("num_kv_heads") or c["num_heads"],
                "num_hidden_layers": c["num_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           **names},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": c["block_size"],
                   "min_length": 0, "past_present_share_buffer": shared, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(folder: Path, manifest: dict, tokenizer) -> dict:
    """genai_config.json (and the tokenizer_config.json it reads beside tokenizer.json), so that
    onnxruntime_genai.Model(EXPORT_DIR) runs the export as it is: the fused fp32 graph when there is
    one, else the portable graph. onnxruntime-genai reads Hugging Face tokenizers, so a char model gets
    none."""
    if tokenizer.kind != "bpe":
        return {"written": False, "note": "onnxruntime-genai needs a Hugging Face tokenizer: export a bpe model"}
    eot = tokenizer.eot_id
    variant = "fused" if "fused" in manifest["files"] else "fp32"
    config = genai_config(manifest, variant, eot)
    stops = sorted(stop_ids(tokenizer))
    if len(stops) > 1:  # a chat model: generation also ends at the end of the assistant's turn
        config["model"]["eos_token_id"] = stops
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    write_chat_fields(folder, tokenizer.chat, {"tokenizer_class": "GPT2TokenizerFast", "add_prefix_space": False,
                                               **special})
    return {"written": True, "files": ["genai_config.json", "tokenizer_config.json", "tokenizer.json"],
            "model": VARIANTS[variant], "past_present_share_buffer": config["search"]["past_present_share_buffer"]}

