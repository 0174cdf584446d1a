"""The Llama family (`model.arch: llama`): rotary positions, RMSNorm, SwiGLU and grouped-query attention,
held to transformers' LlamaForCausalLM on random weights, to its own cached decoding, and through
training, import and export."""

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import BPE, TINY, command, genai_greedy, require, shakespeare
from gpt.checkpoint import load_checkpoint
from gpt.config import ConfigError, ModelConfig, load_run_config
from gpt.generate import generate, generate_uncached
from gpt.model import GPT
from gpt.sampling import SamplingParams

LLAMA = ModelConfig(arch="llama", block_size=32, embedding_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                    vocab_size=65, rope_theta=500.0, norm_eps=1e-6)


def tiny(seed=0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(LLAMA, **changes)).eval()
    with torch.no_grad():  # every tensor random: a gain of 1 or a misplaced one would hide nothing
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    return model


def test_the_parts_are_llamas_and_the_cache_holds_the_kv_heads():
    model = tiny()
    names = {n for n, _ in model.named_parameters()}
    assert "position_embedding.weight" not in names and not any(n.endswith(".bias") for n in names)
    assert {"blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.proj.weight"} <= names
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # H·D + 2·K·D rows
    assert model.blocks[0].mlp.gate.weight.shape == (128, 32)  # 8C/3 = 85.3, up to a multiple of 64
    out = model(torch.randint(0, 65, (3, 10)), use_cache=True)
    assert out.present[0][0].shape == (3, 2, 10, 8)  # (B, K, T, D): half the heads, half the cache
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())  # no position table to leave out


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_cached_decoding_and_chunked_prefill_match_the_whole_sequence(kv):
    model = tiny(num_kv_heads=kv)
    x = torch.randint(0, 65, (2, 20))
    full = model(x).logits
    a = model(x[:, :7], use_cache=True)
    b = model(x[:, 7:12], past=a.present)
    steps = [a.logits, b.logits]
    out = b
    for t in range(12, 20):
        out = model(x[:, t:t + 1], past=out.present)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    prompt = x[0, :5].tolist()
    greedy = SamplingParams(greedy=True)
    assert list(generate(model, prompt, 20, greedy)) == list(generate_uncached(model, prompt, 20, greedy))


def test_left_padding_matches_unpadded():
    model = tiny()
    a, b = torch.randint(0, 65, (1, 9)), torch.randint(0, 65, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1)]).long()
    logits = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[1, 5:], model(b).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], model(a).logits[0], atol=1e-5, rtol=0)


def test_rotary_attention_sees_offsets_not_places():
    """With no position table, shifting every position by the same amount changes nothing."""
    model = tiny()
    x = torch.randint(0, 65, (1, 8))
    positions = torch.arange(8)[None]
    torch.testing.assert_close(model(x, position_ids=positions + 11).logits, model(x, position_ids=positions).logits,
                               atol=1e-4, rtol=0)
    gpt2 = GPT(ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=65)).eval()
    assert not torch.allclose(gpt2(x, position_ids=positions + 11).logits, gpt2(x, position_ids=positions).logits)


def test_the_pictures_hand_built_head_matches_grouped_rotary_attention():
    from gpt.pictures import attention_weights, head_by_hand, position_similarity

    model = tiny(num_kv_heads=1)
    x, attn = torch.randn(2, 10, 32), model.blocks[0].attn
    rope = model.rotary(torch.arange(10)[None].expand(2, 10))
    with torch.no_grad():
        heads = [head_by_hand(attn, x, i, rope) for i in range(4)]
        by_hand = attn.proj(torch.cat([out for _, out in heads], dim=-1))
        module, _ = attn(x, None, None, rope)
    torch.testing.assert_close(by_hand, module, atol=1e-5, rtol=0)
    assert attention_weights(model, torch.randint(0, 65, (1, 7))).shape == (2, 4, 7, 7)
    with pytest.raises(ValueError, match="no position embeddings"):
        position_similarity(model)


@pytest.mark.parametrize("override, message", [
    ("--model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_heads=4"),
    ("--model.embedding_dim=20", "is odd: rotary embeddings turn pairs"),  # 20 / 4 = 5
    ("--model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("--model.intermediate_size=0", "model.intermediate_size=0 must be >= 1"),
])
def test_a_bad_llama_shape_is_a_config_error_naming_the_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(TINY, ["--model.arch=llama", "--model.num_heads=4", "--model.embedding_dim=32", override])


def test_llamas_keys_on_a_gpt2_are_refused_and_the_family_sets_the_bias():
    with pytest.raises(ConfigError, match=r"model.num_kv_heads \(grouped-query attention\) is llama's"):
        load_run_config(TINY, ["--model.num_kv_heads=2"])
    with pytest.raises(ConfigError, match="model.arch='mamba' must be one of gpt2, llama"):
        load_run_config(TINY, ["--model.arch=mamba"])
    assert load_run_config(TINY, ["--model.arch=llama"]).model.bias is False
    assert load_run_config(TINY, []).model.bias is True


# --- Hugging Face in and out ----------------------------------------------------------------------------------

transformers = require("transformers", "pip install -e '.[hf]'")


def llama_folder(folder, tokenizer, **changes):
    """A tiny LlamaForCausalLM with every tensor random, as save_pretrained writes it."""
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000.0, vocab_size=tokenizer.vocab_size,
        tie_word_embeddings=False, bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, **changes)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    model.save_pretrained(str(folder))
    tokenizer.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    from gpt.tokenizer import BPETokenizer

    return BPETokenizer.train([shakespeare()[:100_000]], 300)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, tokenizer):
    return llama_folder(tmp_path_factory.mktemp("hf") / "tiny-llama", tokenizer)


def test_import_matches_transformers_logits_and_greedy_tokens(hf_llama):
    from gpt.hf import import_hf, parity_with_transformers

    model = import_hf(hf_llama)
    c = model.config
    assert (c.arch, c.num_layers, c.embedding_dim, c.num_heads, c.kv_heads, c.mlp_dim) == ("llama", 2, 32, 4, 2, 72)
    assert (c.block_size, c.rope_theta, c.norm_eps, c.bias, c.tie_embeddings) == (64, 1000.0, 1e-6, False, False)
    parity = parity_with_transformers(model, hf_llama)
    assert parity["max_rel_logit_error"] < 1e-5 and parity["passed"], parity
    assert parity["greedy_tokens"] == 56 and parity["greedy_identical"]


def test_what_we_write_transformers_reads_with_our_logits(tmp_path, tokenizer):
    from gpt.hf import export_hf_folder

    for tie in (False, True):
        model = tiny(vocab_size=tokenizer.vocab_size, tie_embeddings=tie, num_kv_heads=1)
        export_hf_folder(model, tokenizer, tmp_path / str(tie))
        loaded, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / str(tie)),
                                                                    output_loading_info=True)
        assert not any(info.values()), info
        ids = torch.randint(0, tokenizer.vocab_size, (2, 20))
        with torch.no_grad():
            ours, theirs = model(ids).logits, loaded.eval()(ids).logits
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling=.* is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "mlp_bias=False is not supported"),
])
def test_a_llama_we_cannot_run_is_refused_before_any_work(tmp_path, tokenizer, changes, message):
    from gpt.hf import HFError, read_config

    folder = llama_folder(tmp_path / "odd", tokenizer, **changes)
    with pytest.raises(HFError, match=message):
        read_config(folder)


def test_another_model_type_is_refused_naming_what_is_supported(tmp_path):
    from gpt.hf import HFError, read_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32}))
    with pytest.raises(HFError, match="model_type 'qwen2'; only 'gpt2' .* and 'llama' .* can be imported"):
        read_config(tmp_path)


@pytest.mark.slow
def test_train_a_llama_then_fine_tune_one_from_transformers_and_write_it_back(tmp_path, hf_llama, fresh_accelerate):
    """The command line on both paths: a llama from scratch (GQA, Muon), and init_from=hf: a Llama folder,
    a few steps, `export --format hf` of the result read back by transformers."""
    scratch = tmp_path / "scratch"
    command("launch", str(TINY), f"--train.out_dir={scratch}", "--train.max_iters=30", "--model.arch=llama",
            "--model.num_kv_heads=1", "--train.optimizer=muon", *BPE)
    model, _, meta = load_checkpoint(scratch)
    assert model.config.arch == "llama" and model.config.kv_heads == 1 and meta["step"] == 30
    metrics = [json.loads(line) for line in (scratch / "metrics.jsonl").read_text().splitlines()]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0] - 0.4, losses  # it learns (6.25 -> 5.62 nats when written)

    tuned = tmp_path / "tuned"
    command("launch", str(TINY), f"--train.out_dir={tuned}", f"--model.init_from=hf:{hf_llama}",
            "--train.max_iters=5", "--model.block_size=48")
    model, tokenizer, _ = load_checkpoint(tuned)
    assert model.config.block_size == 48 and model.config.rope_theta == 1000.0  # the run's context, the model's rest
    report = json.loads((tuned / "run.json").read_text())
    assert report["init_from"]["parity"]["passed"], report["init_from"]
    out = tmp_path / "hf-out"
    command("export", str(tuned), str(out), "--format", "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# --- ONNX: the portable graph, its variants, our runtime, onnxruntime-genai -------------------------------------

@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """A tiny byte-level BPE llama (2 key/value heads for 4 query heads of 16 dimensions, which
    GroupQueryAttention turns itself), trained 40 steps and exported with every variant, through every gate."""
    from conftest import made_once

    run = made_once(tmp_path_factory, "llama-run", lambda out: command(
        "launch", str(TINY), f"--train.out_dir={out}", "--train.max_iters=40", "--model.arch=llama",
        "--model.num_heads=4", "--model.num_kv_heads=2", "--model.embedding_dim=64", *BPE))
    out = made_once(tmp_path_factory, "llama-export", lambda out: command(
        "export", str(run), str(out), "--int8", "--int4", "--int8-weights", "--fp16", "--optimize"))
    return run, out


@pytest.mark.slow
def test_a_llama_exports_through_every_gate_and_serves_as_pytorch_generates(llama_export):
    from gpt.generate import generate as torch_generate
    from serve.generate import generate as ort_generate
    from serve.manifest import read_manifest
    from serve.playground import parameter_count
    from serve.runtime import OnnxModel

    run, out = llama_export
    manifest = read_manifest(out)
    assert manifest["model"]["arch"] == "llama" and manifest["model"]["num_kv_heads"] == 2
    parity = manifest["parity"]
    assert parity["fp32"]["max_rel_logit_error"] < 1e-4 and parity["greedy"]["identical"]
    assert parity["fused"]["max_rel_logit_error"] < 1e-4 and parity["fused_greedy"]["identical"]
    assert set(manifest["files"]) == {"fp32", "int8", "int4", "int8w", "fp16", "fused", "fused-int8", "fused-int4",
                                      "fused-int8w", "fused-fp16"}
    ops = manifest["graphs"]["fused"]["ops"]
    # 2 per block, less the first ln_1 (standard ops), plus ln_f (fused with the last residual add)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    # each variant's validation loss within its tolerance: dynamic int8 scales a whole activation
    # tensor at once, which a 40-step model's outliers cost most
    for variant, tolerance in (("int8", 0.15), ("int4", 0.05), ("int8w", 0.01), ("fused-int4", 0.05)):
        change = manifest["quality"][variant]["val_loss_change"]
        assert abs(change) < tolerance, (variant, change)
    model, tokenizer, _ = load_checkpoint(run)
    assert parameter_count(manifest["model"]) == model.num_parameters(exclude_positions=False)
    prompt = "ROMEO: But soft"
    ids = tokenizer.encode(prompt)
    expected = list(torch_generate(model, ids, 60, SamplingParams(greedy=True)))
    for variant in ("fp32", "fused"):
        runtime = OnnxModel(out, threads=1, variant=variant)
        if variant == "fp32":
            assert runtime.empty_cache(1)[0].shape() == [1, 2, 0, model.config.head_dim]  # the 2 key/value heads
        ours = list(ort_generate(runtime, prompt, 60, SamplingParams(greedy=True)))[-1].sequence.generated
        assert ours == expected[:len(ours)] and len(ours) > 10, variant


@pytest.mark.parametrize("width", [32, 64], ids=["head 8: turned before the op", "head 16: turned by the op"])
def test_the_fused_graph_turns_queries_and_keys_either_way_and_passes_the_gates(tmp_path, width):
    """GroupQueryAttention turns queries and keys itself (do_rotary, from cos and sin tables) only for
    heads a multiple of 16 wide; narrower heads are turned in standard ops first. Either graph passes the
    parity grid (ragged batches, a chunk after a past) and the greedy gate, past the context window."""
    import onnx

    from bench.common import VOCAB
    from export.pipeline import export
    from gpt.checkpoint import write_model_files
    from gpt.config import RunConfig
    from gpt.tokenizer import CharTokenizer

    model = tiny(embedding_dim=width, vocab_size=len(VOCAB), block_size=24)
    run = RunConfig()
    run.model = model.config
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", model, CharTokenizer(VOCAB), {"step": 0}, run.to_dict())
    manifest = export(tmp_path / "ckpt", tmp_path / "out", optimize=True, log=lambda s: None)
    parity = manifest["parity"]
    assert parity["fused"]["passed"] and parity["fused"]["max_rel_logit_error"] < 1e-4, parity["fused"]
    assert parity["fused_greedy"]["identical"] and parity["fused_greedy"]["tokens"] > model.config.block_size
    graph = onnx.load(tmp_path / "out" / manifest["files"]["fused"], load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    rotary = [{a.name: a.i for a in n.attribute}.get("do_rotary", 0) for n in attention]
    assert rotary == [int(width == 64)] * 2
    assert ("Split" in manifest["graphs"]["fused"]["ops"]) == (width == 32)  # the QKV split to be turned by hand


@pytest.mark.slow
def test_onnxruntime_genai_runs_a_llama_export_as_a_llama(llama_export):
    og = require("onnxruntime_genai", "pip install onnxruntime-genai (in the test extra)")
    from serve.generate import generate as ort_generate
    from serve.runtime import OnnxModel

    _, out = llama_export
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["type"] == "llama" and config["decoder"]["num_key_value_heads"] == 2
    model = og.Model(str(out))
    prompt = "ROMEO: But soft"
    runtime = OnnxModel(out, threads=1, variant="fp32")
    ids = runtime.tokenizer.encode(prompt)
    n = runtime.block_size - len(ids)  # onnxruntime-genai stops at the context length; we would refill
    theirs = genai_greedy(model, ids, n)
    ours = list(ort_generate(runtime, prompt, n, SamplingParams(greedy=True)))[-1].sequence.generated
    assert len(ours) >= 10 and theirs[:len(ours)] == ours


def test_a_llama_from_transformers_fine_tunes_on_conversations_with_its_own_template(tmp_path, hf_llama, tokenizer):
    """A folder that brings its chat template (as SmolLM2's does) keeps it; the template's markers it
    lacks become new ids (the untied head grows too), and transformers reads back the same prompt ids
    and logits."""
    from conftest import conversation_file, task_words
    from gpt.chat import prompt_ids

    folder = tmp_path / "with-template"
    shutil.copytree(hf_llama, folder)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}))
    data = conversation_file(tmp_path / "chat.jsonl", task_words()[0], 100)
    run = tmp_path / "run"
    command("launch", "configs/chat_sft_cpu.yaml", f"--model.init_from=hf:{folder}", f"--data.path={data}",
            f"--train.out_dir={run}", "--train.max_iters=3", "--train.eval_interval=3", "--train.eval_iters=1",
            "--train.checkpoint_interval=3", "--model.block_size=48")
    model, tuned_tokenizer, _ = load_checkpoint(run)
    assert tuned_tokenizer.chat.template == template
    assert model.config.vocab_size == tokenizer.vocab_size + 2  # <|im_start|> and <|im_end|>
    out = tmp_path / "hf-out"
    command("export", str(run), str(out), "--format", "hf")
    messages = [{"role": "user", "content": "thou"}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == prompt_ids(tuned_tokenizer, tuned_tokenizer.chat, messages)
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    x = torch.tensor([ids])
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
