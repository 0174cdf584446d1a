"""`--format gguf` against the real llama.cpp (llama-cpp-python, built from source by the test extra):
the f32 file's logits equal our ONNX fp32 logits, greedy tokens are identical, llama.cpp's own
tokenizer encodes as ours does, and the quantized types score within a stated tolerance. llama.cpp runs in a child
process (bench.engines): a build that dies of a signal on this host fails the test in one line."""

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from bench.engines import EngineCrash, cpu_flags, crash_line, in_child, isa_line
from conftest import BPE, REQUIRE_ALL, ROOT, TINY, command, made_once, shakespeare
from export.gguf import export_gguf
from gpt.sampling import log_softmax
from serve.manifest import ExportError
from serve.runtime import OnnxModel

pytestmark = pytest.mark.slow
LLAMA_CPP_FIX = "pip install -e '.[test]' with CMAKE_ARGS=\"$(sh .ci/llama-cpp-args)\" (README command 2)"
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None and not REQUIRE_ALL,
                                     reason=f"llama-cpp-python is missing: {LLAMA_CPP_FIX}")
LONG = ["--model.block_size=128", "--train.max_iters=60"]  # room for 100 greedy tokens after a prompt
PROMPTS = {"char": "ROMEO:\nWhat say", "bpe": "ROMEO:\nWhat say you, café señor? 1234"}
PROMPTS["llama"] = PROMPTS["bpe"]
# llama.cpp's quantized types against our fp32 graph: the log-probability of each next token of 100 held-out
# tokens, in nats (mean, max); about 2.5x the worst of the three models here (q8_0 0.0021 / 0.0095, q4_0
# 0.0328 / 0.197)
QUANTIZED_TOLERANCE = {"q8_0": (0.006, 0.025), "q4_0": (0.08, 0.5)}


KINDS = {"char": [], "bpe": BPE, "llama": [*BPE, "--model.arch=llama", "--model.num_heads=4", "--model.num_kv_heads=2"]}


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory):
    kind = request.param
    extra = KINDS[kind]
    run = made_once(tmp_path_factory, f"gguf-run-{kind}", lambda out: command(
        "launch", str(TINY), f"--train.out_dir={out}", *LONG, *extra))
    onnx = made_once(tmp_path_factory, f"gguf-onnx-{kind}", lambda out: command("export", str(run), str(out)))
    gguf = made_once(tmp_path_factory, f"gguf-{kind}", lambda out: command(
        "export", str(run), str(out), "--format", "gguf", "--gguf-type", "f32,f16,q8_0,q4_0"))
    return kind, run, onnx, gguf


def llama(path, n_ctx, ids, greedy, **extra) -> dict:
    """bench.engines.llama_run on one GGUF file, in a child process; a crash fails the test in one line."""
    try:
        return in_child("llama.cpp", f"running {path.name}", "bench.engines:llama_run",
                        {"path": str(path), "n_ctx": n_ctx, "ids": ids, "greedy": greedy, **extra})
    except EngineCrash as crash:
        pytest.fail(str(crash), pytrace=False)


def onnx_greedy(runtime, ids, n):
    from gpt.sampling import SamplingParams
    from serve.generate import generate

    text = runtime.tokenizer.decode(ids)
    events = list(generate(runtime, text, n, SamplingParams(greedy=True)))
    return events[-1].sequence.generated


@needs_llama_cpp
def test_the_f32_file_is_our_model_in_llama_cpp(exported):
    kind, _, onnx, gguf = exported
    report = json.loads((gguf / "export_report.json").read_text())
    assert sorted(report["files"]) == ["f16", "f32", "q4_0", "q8_0"] and (gguf / "Modelfile").is_file()
    runtime = OnnxModel(onnx, threads=1)
    ids = runtime.tokenizer.encode(PROMPTS[kind])
    n = 100
    expected = onnx_greedy(runtime, ids, n)
    f32 = llama(gguf / "model.f32.gguf", runtime.block_size, ids, n, text=PROMPTS[kind], logits=True)
    # llama.cpp's own tokenizer, from the vocabulary in the file: the same ids (non-ASCII included for bpe)
    assert f32["tokenize"] == ids
    ours, _ = runtime.run(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                          runtime.empty_cache(1))
    theirs = np.array(f32["logits"])
    rel = float(np.abs(theirs - ours[0]).max() / np.abs(ours[0]).max())
    assert rel < 1e-3, rel  # llama.cpp's GELU goes through an fp16 table and its KV cache is f16
    assert f32["greedy"] == expected
    assert llama(gguf / "model.f16.gguf", runtime.block_size, ids, n)["greedy"] == expected
    # the quantized types: llama.cpp's logits at every prompt position against our fp32 graph's, as
    # log-probabilities of the tokens that follow (on a barely trained model greedy tokens part at near-ties)
    held_out = runtime.tokenizer.encode(shakespeare()[-3000:])[:100]
    reference, _ = runtime.run(np.array([held_out]), np.ones((1, 100), np.int64), np.arange(100)[None],
                               runtime.empty_cache(1))
    reference = log_softmax(reference[0])
    for quantized, bound in QUANTIZED_TOLERANCE.items():
        theirs = log_softmax(np.array(llama(gguf / f"model.{quantized}.gguf", runtime.block_size, held_out, 0,
                                            logits=True)["logits"]))
        gap = np.abs(theirs - reference)[np.arange(99), held_out[1:]]
        print(f"{kind} {quantized}: {gap.mean():.4f} nats/token from fp32 (max {gap.max():.4f})")
        assert gap.mean() <= bound[0] and gap.max() <= bound[1], (quantized, gap.mean(), gap.max())


def test_a_real_engine_that_dies_of_a_signal_is_one_line_naming_it_the_signal_and_the_cpu():
    """What a SIGILL in llama.cpp becomes (here a real SIGSEGV: ctypes reads address 0 in the child):
    an EngineCrash line, and this process goes on."""
    with pytest.raises(EngineCrash) as crash:
        in_child("llama.cpp", "loading model.f32.gguf", "ctypes:string_at", {"ptr": 0})
    line = str(crash.value)
    assert "\n" not in line and line.startswith("llama.cpp died of SIGSEGV while loading model.f32.gguf")
    assert f"(CPU flags: {isa_line()})" in line
    # a SIGILL says what it means and what to do
    sigill = crash_line("llama.cpp", "evaluating a prompt", -4)
    assert "died of SIGILL" in sigill and "illegal instruction" in sigill and "pip cache remove" in sigill


HOSTS = {  # /proc/cpuinfo's flags line of each kind of host the README's test command must work on
    "intel-amx": "fpu sse2 sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
                 "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16",
    "amd-avx2": "fpu sse2 sse4_2 avx avx2 fma f16c bmi2",
}


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_llama_cpp_is_built_with_each_instruction_set_of_the_host_and_never_amx(host, tmp_path):
    """.ci/llama-cpp-args, which README command 2 and CI build llama.cpp with, on each kind of host."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {HOSTS[host]}\n")
    args = subprocess.run(["sh", str(ROOT / ".ci" / "llama-cpp-args"), str(cpuinfo)], capture_output=True,
                          text=True, check=True).stdout.split()
    on = {a[2:-3] for a in args if a.endswith("=ON")}
    lean = f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={ROOT / '.ci' / 'llama-cpp-lean.cmake'}"
    assert "-DGGML_NATIVE=OFF" in args and "-DLLAVA_BUILD=OFF" in args and lean in args
    assert not {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"} & on
    assert {"GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"} <= on
    wide = {"GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI", "GGML_AVX_VNNI"}
    assert (wide <= on) if host == "intel-amx" else not (wide & on)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd dotprod\n")  # no x86 flags: the native build stays
    assert subprocess.run(["sh", str(ROOT / ".ci" / "llama-cpp-args"), str(arm)], capture_output=True,
                          text=True, check=True).stdout.split() == ["-DLLAVA_BUILD=OFF", lean]


@needs_llama_cpp
def test_the_installed_llama_cpp_uses_what_this_host_has_and_no_amx():
    """The llama.cpp in use (perhaps a wheel pip cached on another host, or built -march=native) asks for
    no instruction this host lacks, and for no AMX."""
    try:
        built = in_child("llama.cpp", "reading its system info", "bench.engines:llama_system_info", {})["flags"]
    except EngineCrash as crash:
        pytest.fail(str(crash), pytrace=False)
    host = cpu_flags()
    fix = "rebuild it: pip cache remove llama_cpp_python, then README command 2's install"
    assert "AMX_INT8" not in built, f"llama.cpp was built with AMX, which this host may refuse; {fix}"
    if "sse2" in host:  # x86-64
        needs = {"AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni",
                 "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni"}
        lacking = [name for name, flag in needs.items() if built.get(name) == "1" and flag not in host]
        assert not lacking, f"llama.cpp was built for {', '.join(lacking)}, which this CPU lacks; {fix}"
        assert built.get("AVX2") == ("1" if "avx2" in host else None), built


def test_the_file_names_its_run_and_force_replaces_only_a_gguf_export(exported, tmp_path):
    import gguf as gguf_py

    kind, run, _, gguf = exported
    reader = gguf_py.GGUFReader(str(gguf / "model.q8_0.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    description = bytes(fields["general.description"].parts[-1]).decode()
    assert run.name in description and "step 60" in description
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    if kind == "llama":  # llama.cpp's llama: q, k, v apart, RMSNorm gains, the gated MLP, 2 key/value heads
        assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
        assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
        assert kinds["blk.0.attn_k.weight"] == "Q8_0" and kinds["blk.0.ffn_gate.weight"] == "Q8_0"
        assert "blk.0.attn_norm.bias" not in kinds and "position_embd.weight" not in kinds
    else:
        assert bytes(fields["general.architecture"].parts[-1]).decode() == "gpt2"
        assert kinds["blk.0.attn_qkv.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_gguf(run, gguf, types=["f32"], log=lambda s: None)
    with pytest.raises(ExportError, match="is not one of f32, f16"):
        export_gguf(run, tmp_path / "x", types=["q3_k"], log=lambda s: None)
