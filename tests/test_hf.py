"""Hugging Face GPT-2 in and out, with a tiny GPT2LMHeadModel built here (no network)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, require, shakespeare, subprocess_env
from export.hf import export_hf
from export.pipeline import export
from gpt.checkpoint import load_checkpoint
from gpt.config import ConfigError
from gpt.hf import import_hf, parity_with_transformers, read_config
from gpt.tokenizer import BPETokenizer
from launch.train import main, setup
from serve.manifest import ExportError

transformers = require("transformers", "pip install -e '.[hf]'")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A 2-layer, 32-wide GPT-2 with a 300-token byte-level BPE, as save_pretrained writes it, every tensor
    random (a fresh GPT-2's biases are 0 and its LayerNorm gains 1: a misplaced one would pass)."""
    text = shakespeare()
    tokenizer = BPETokenizer.train([text[:200_000]], 300)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=tokenizer.vocab_size,
                                     bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    model.save_pretrained(str(folder))
    tokenizer.save(folder / "tokenizer.json")
    return folder


def test_import_matches_transformers_logits_and_greedy_tokens(hf_folder):
    model = import_hf(hf_folder)
    c = model.config
    assert (c.num_layers, c.embedding_dim, c.num_heads, c.block_size, c.vocab_size) == (2, 32, 4, 128, 300)
    assert c.tie_embeddings and model.lm_head.weight is model.token_embedding.weight
    parity = parity_with_transformers(model, hf_folder)
    assert parity["passed"] and parity["max_rel_logit_error"] < 1e-5
    assert parity["greedy_tokens"] == 100 and parity["greedy_identical"]


@pytest.mark.slow
def test_fine_tune_export_back_and_to_onnx(hf_folder, tmp_path, fresh_accelerate):
    run_dir = tmp_path / "run"
    config, start = setup(str(TINY), [f"--train.out_dir={run_dir}", f"--model.init_from=hf:{hf_folder}",
                                      "--train.max_iters=20", "--train.learning_rate=1e-3", "--model.dropout=0.1"],
                          resume=False)
    assert config.model.block_size == 128 and config.data.tokenizer == "bpe"  # the folder's shape and tokenizer
    assert config.model.dropout == 0.1  # the run's own
    result = main(config, start)
    report = json.loads((run_dir / "run.json").read_text())
    assert report["init_from"]["parity"]["passed"] and report["init_from"]["parity"]["greedy_identical"]
    model, tokenizer, _ = load_checkpoint(run_dir)
    assert model.config.tie_embeddings and tokenizer.vocab_size == 300
    before = import_hf(hf_folder)
    assert not torch.equal(model.token_embedding.weight, before.token_embedding.weight)  # it trained
    for (name, a), (_, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name

    out = tmp_path / "hf-out"
    printed = []
    export_hf(run_dir, out, log=printed.append)
    assert "identical: True" in printed[0]
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ids = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tokenizer("naïve ROMEO:")["input_ids"] == tokenizer.encode("naïve ROMEO:")
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["max_rel_logit_error"] < 1e-5

    onnx_out = tmp_path / "onnx"
    export(run_dir, onnx_out, int8=True, log=lambda s: None)
    manifest = json.loads((onnx_out / "manifest.json").read_text())
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["greedy"]["identical"]
    proc = subprocess.run([sys.executable, "-m", "serve", str(onnx_out), "--prompt", "Ça va, ROMEO?",
                           "--max-new-tokens", "20"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Ça va, ROMEO?"), proc.stderr


def folder_with(hf_folder, tmp_path, change):
    dest = tmp_path / "changed"
    shutil.copytree(hf_folder, dest)
    change(dest)
    return dest


def edit_config(key, value):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


@pytest.mark.parametrize("name, change, message", [
    ("qwen2", edit_config("model_type", "qwen2"), r"model_type 'qwen2'; only 'gpt2' \(GPT2LMHeadModel\) and 'llama'"),
    ("other activation", edit_config("activation_function", "relu"), "activation_function='relu'"),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    ("only a pickle", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
     "pytorch_model.bin, a pickle, which is never loaded"),
    ("no tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    ("another vocabulary", lambda d: BPETokenizer.train(["some other text " * 50], 280).save(d / "tokenizer.json"),
     r"has \d+ tokens but the weights have 300"),
    ("not a folder", lambda d: shutil.rmtree(d), "is not a folder"),
])
def test_bad_folders_fail_before_training_with_one_line(hf_folder, tmp_path, name, change, message):
    folder = folder_with(hf_folder, tmp_path, change)
    with pytest.raises(ConfigError, match=message) as e:
        config, start = setup(str(TINY), [f"--train.out_dir={tmp_path / 'run'}", f"--model.init_from=hf:{folder}"],
                              resume=False)
        main(config, start)  # the weights are read here
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_char_model_is_written_as_gpt2_with_a_byte_level_twin_of_its_vocabulary(run_dir, tmp_path):
    from transformers import AutoTokenizer

    report = export_hf(run_dir, tmp_path / "x", log=lambda s: None)
    assert report["parity"]["passed"] and report["parity"]["greedy_identical"]
    _, ours, _ = load_checkpoint(run_dir)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "x"))
    text = "ROMEO:\nWhat say you, my lord? 3"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text


def test_read_config_takes_the_shape_from_the_folder(hf_folder):
    c = read_config(hf_folder)
    assert (c.block_size, c.embedding_dim, c.vocab_size, c.bias) == (128, 32, 300, True)


def test_a_folder_that_transformers_reads_differently_is_not_written(run_dir, tmp_path, monkeypatch):
    """The folder as written is loaded by transformers and held to our logits: one tensor off (the final
    LayerNorm's gain, scaled by 1.01) and the export is refused, nothing published."""
    from safetensors.torch import load_file, save_file

    import gpt.hf

    real = gpt.hf.export_hf_folder

    def one_tensor_off(model, tokenizer, folder):
        real(model, tokenizer, folder)
        weights = load_file(str(folder / "model.safetensors"))
        weights["transformer.ln_f.weight"] = weights["transformer.ln_f.weight"] * 1.01
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(gpt.hf, "export_hf_folder", one_tensor_off)
    with pytest.raises(ExportError, match=r"^transformers reads the folder differently \(.*'passed': False"):
        export_hf(run_dir, tmp_path / "off", log=lambda s: None)
    assert not (tmp_path / "off").exists()
