"""`--format gguf` against the real llama.cpp (llama-cpp-python, built from source by the test extra):
the f32 file's logits equal our ONNX fp32 logits, greedy tokens are identical, llama.cpp's own
tokenizer encodes as ours does, and the quantized types mostly agree."""

import json

import numpy as np
import pytest

from conftest import BPE, TINY, command, made_once
from export.gguf import export_gguf
from serve.manifest import ExportError
from serve.runtime import OnnxModel

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install -e '.[test]')")
pytestmark = pytest.mark.slow
LONG = ["--model.block_size=128", "--train.max_iters=60"]  # room for 100 greedy tokens after a prompt
PROMPTS = {"char": "ROMEO:\nWhat say", "bpe": "ROMEO:\nWhat say you, café señor? 1234"}


@pytest.fixture(scope="module", params=["char", "bpe"])
def exported(request, tmp_path_factory):
    kind = request.param
    extra = BPE if kind == "bpe" else []
    run = made_once(tmp_path_factory, f"gguf-run-{kind}", lambda out: command(
        "launch", str(TINY), f"--train.out_dir={out}", *LONG, *extra))
    onnx = made_once(tmp_path_factory, f"gguf-onnx-{kind}", lambda out: command("export", str(run), str(out)))
    gguf = made_once(tmp_path_factory, f"gguf-{kind}", lambda out: command(
        "export", str(run), str(out), "--format", "gguf", "--gguf-type", "f32,f16,q8_0,q4_0"))
    return kind, run, onnx, gguf


def llama(path, n_ctx):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                           verbose=False)


def llama_logits(model, ids):
    model.reset()
    model.eval(ids)
    return np.array(model.scores[:len(ids)], dtype=np.float64)


def greedy(model, ids, n):
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


def onnx_greedy(runtime, ids, n):
    from gpt.sampling import SamplingParams
    from serve.runtime import generate

    text = runtime.tokenizer.decode(ids)
    events = list(generate(runtime, text, n, SamplingParams(greedy=True)))
    return events[-1].sequence.generated


def test_the_f32_file_is_our_model_in_llama_cpp(exported):
    kind, _, onnx, gguf = exported
    report = json.loads((gguf / "export_report.json").read_text())
    assert sorted(report["files"]) == ["f16", "f32", "q4_0", "q8_0"] and (gguf / "Modelfile").is_file()
    runtime = OnnxModel(onnx, threads=1)
    ids = runtime.tokenizer.encode(PROMPTS[kind])
    f32 = llama(gguf / "model.f32.gguf", runtime.block_size)
    # llama.cpp's own tokenizer, from the vocabulary in the file: the same ids (non-ASCII included for bpe)
    assert f32.tokenize(PROMPTS[kind].encode(), add_bos=False, special=False) == ids
    theirs = llama_logits(f32, ids)
    ours, _ = runtime.run(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                          runtime.empty_cache(1))
    rel = float(np.abs(theirs - ours[0]).max() / np.abs(ours[0]).max())
    assert rel < 1e-3, rel  # llama.cpp's GELU goes through an fp16 table and its KV cache is f16
    n = 100
    expected = onnx_greedy(runtime, ids, n)
    assert greedy(f32, ids, n) == expected
    assert greedy(llama(gguf / "model.f16.gguf", runtime.block_size), ids, n) == expected
    for quantized in ("q8_0", "q4_0"):
        got = greedy(llama(gguf / f"model.{quantized}.gguf", runtime.block_size), ids, n)
        agree = sum(a == b for a, b in zip(got, expected)) / n
        print(f"{kind} {quantized}: {agree:.0%} of {n} greedy tokens as fp32's")
        assert agree >= (0.5 if quantized == "q8_0" else 0.2), (quantized, agree)


def test_the_file_names_its_run_and_force_replaces_only_a_gguf_export(exported, tmp_path):
    import gguf as gguf_py

    kind, run, _, gguf = exported
    reader = gguf_py.GGUFReader(str(gguf / "model.q8_0.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    description = bytes(fields["general.description"].parts[-1]).decode()
    assert run.name in description and "step 60" in description
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gpt2"
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_qkv.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_gguf(run, gguf, types=["f32"], log=lambda s: None)
    with pytest.raises(ExportError, match="is not one of f32, f16"):
        export_gguf(run, tmp_path / "x", types=["q3_k"], log=lambda s: None)
