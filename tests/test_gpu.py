"""Every CUDA path: `python -m pytest -m gpu` on a machine with a GPU (skipped without one).

PyTorch tests need CUDA; onnxruntime tests also need onnxruntime-gpu (`pip install -e ".[serve-gpu]"`
in an environment without the CPU `onnxruntime`). Comparisons of fp32 results run with TF32 off,
in PyTorch and in onnxruntime, and say their tolerance; each test stays under a minute on one GPU.
"""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import CORPUS, ROOT, TINY, subprocess_env
from gpt.checkpoint import load_checkpoint
from gpt.config import DataConfig, ModelConfig
from gpt.datasets import resolve_corpus
from gpt.generate import generate as torch_generate
from gpt.generate import generate_uncached
from gpt.model import GPT
from gpt.sampling import SamplingParams

CUDA = torch.cuda.is_available()


def ort_cuda() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
needs_ort_cuda = pytest.mark.skipif(not ort_cuda(), reason="needs onnxruntime-gpu (pip install -e '.[serve-gpu]')")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 here: TF32 matmuls differ from the CPU by ~1e-3."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=65)).eval()


# --- the model on CUDA -------------------------------------------------------------------------------

@torch.no_grad()
def test_forward_on_cuda_equals_cpu_full_chunked_padded_and_one_token():
    cpu = tiny_model()
    gpu = tiny_model().cuda()
    x = torch.randint(0, 65, (3, 20))
    ref = cpu(x).logits
    torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), ref, atol=1e-4, rtol=1e-4)
    a = gpu(x[:, :7].cuda(), use_cache=True)  # chunked prefill against a past
    b = gpu(x[:, 7:].cuda(), past=a.present)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1).cpu(), ref, atol=1e-4, rtol=1e-4)
    out, steps = gpu(x[:, :1].cuda(), use_cache=True), []  # one token at a time
    steps.append(out.logits)
    for t in range(1, 20):
        out = gpu(x[:, t:t + 1].cuda(), past=out.present)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), ref, atol=1e-4, rtol=1e-4)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[:1, :15]], 1)  # left padding
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = gpu(padded.cuda(), attention_mask=mask.cuda(), position_ids=positions.cuda()).logits[:, 5:]
    torch.testing.assert_close(got.cpu(), cpu(x[:1, :15]).logits, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(gpu(x.cuda()).logits).all()


def test_cached_generation_equals_uncached_on_cuda():
    model = tiny_model().cuda()
    prompt = [1, 2, 3, 4]
    n = 2 * model.config.block_size + 5  # past the window, so the refill runs too
    assert list(torch_generate(model, prompt, n, SamplingParams(greedy=True))) == \
        list(generate_uncached(model, prompt, n, SamplingParams(greedy=True)))


# --- training on CUDA ----------------------------------------------------------------------------------

def train(out_dir, *overrides, config=TINY, resume=False):
    from launch.train import main, setup

    cfg, start = setup(str(config), [f"--train.out_dir={out_dir}", "--train.device=cuda", *overrides], resume)
    return main(cfg, start)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_forty_steps_lower_the_loss_and_save_a_plain_fp32_checkpoint(tmp_path, fresh_accelerate, precision):
    result = train(tmp_path, "--train.max_iters=40", f"--train.mixed_precision={precision}", "--train.eval_interval=40")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert json.loads((tmp_path / "run.json").read_text())["device"].startswith("cuda")
    model, _, _ = load_checkpoint(tmp_path)  # strict load of plain keys, on the CPU
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for (name, a), (_, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a.cpu(), b), name


def test_resume_on_cuda_stays_close_to_a_straight_run(tmp_path, fresh_accelerate):
    """CUDA attention backward is not bit-deterministic: resume matches within 1e-3 of the weights' scale."""
    import shutil

    straight = train(tmp_path / "a", "--train.max_iters=40").model
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000020", tmp_path / "b" / "checkpoints" / "step-000020")
    resumed = train(tmp_path / "b", "--train.max_iters=40", resume=True).model
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-3 * float(a.abs().max()) + 1e-6, rtol=0, msg=name)


def test_compile_on_one_gpu_saves_a_checkpoint_that_loads_and_exports(tmp_path, fresh_accelerate):
    from export.pipeline import export

    train(tmp_path / "run", "--train.max_iters=20", "--train.compile=true", "--train.mixed_precision=bf16")
    load_checkpoint(tmp_path / "run")
    manifest = export(tmp_path / "run", tmp_path / "export", log=lambda s: None)
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["greedy"]["identical"]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_torchrun_ddp_with_accumulation_saves_a_checkpoint_that_loads(tmp_path, compile):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "tests" / "ddp_probe.py"), str(TINY), f"--train.out_dir={out}", "--train.device=cuda",
         "--train.max_iters=20", "--train.gradient_accumulation_steps=2", f"--train.compile={str(compile).lower()}"],
        cwd=ROOT, env=subprocess_env(cuda=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "run.json").read_text())["distributed_type"] == "DistributedType.MULTI_GPU"
    load_checkpoint(out)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fsdp_on_one_gpu_in_bf16_shards_saves_resumes_and_exports(tmp_path, compile):
    """FSDP2 over one CUDA rank (torchrun, nccl): bf16 weights gathered for the blocks and fp32 gradient
    reduction (MixedPrecisionPolicy), Muon, activation checkpointing and per-block compile; the sharded
    checkpoint resumes (CUDA attention backward is not bit-deterministic: within 1e-3 of the weights'
    scale) and exports."""
    import shutil

    from export.pipeline import export

    def launch(out, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
             "--num_processes", "1", str(ROOT / "tests" / "ddp_probe.py"), str(TINY), f"--train.out_dir={out}",
             "--train.device=cuda", "--train.mixed_precision=bf16", "--train.optimizer=muon", "--train.max_iters=40",
             "--train.activation_checkpointing=true", f"--train.compile={str(compile).lower()}", *extra],
            cwd=ROOT, env=subprocess_env(cuda=True), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = launch(tmp_path / "a")
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["distributed_type"] == "FSDP2" and run["device"].startswith("cuda")
    assert "sharded: FSDP2" in out and "peak mem" in out
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000020", tmp_path / "b" / "checkpoints" / "step-000020")
    launch(tmp_path / "b", "--resume")
    straight, resumed = (load_checkpoint(tmp_path / r)[0].state_dict() for r in ("a", "b"))
    for name, a in straight.items():
        torch.testing.assert_close(resumed[name], a, atol=1e-3 * float(a.abs().max()) + 1e-6, rtol=0, msg=name)
    manifest = export(tmp_path / "a", tmp_path / "export", log=lambda s: None)
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["greedy"]["identical"]


def test_the_seed_config_in_bf16_reports_speed_memory_and_mfu(tmp_path, fresh_accelerate):
    torch.cuda.reset_peak_memory_stats()
    result = train(tmp_path, "--train.max_iters=60", "--train.log_interval=20", "--train.eval_interval=60",
                   "--train.eval_iters=5", "--train.checkpoint_interval=60", "--train.mixed_precision=bf16",
                   config=ROOT / "configs" / "shakespeare_char.yaml")
    m = result.metrics
    memory = torch.cuda.max_memory_allocated() / 2**30
    print(f"\nseed config, bf16, {torch.cuda.get_device_name()}: {m['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {m['mfu'] if m['mfu'] is None else format(m['mfu'], '.1%')}, peak memory {memory:.2f} GiB, "
          f"val loss {m['val_loss']:.3f} at step 60")
    assert m["tokens_per_s"] > 0 and np.isfinite(m["val_loss"])
    assert_mfu(m, tmp_path)


def assert_mfu(m: dict, out_dir) -> None:
    """MFU is the model's FLOPs per token at the measured rate over the card's bf16 peak (none for a card
    whose peak is not known: it is not guessed)."""
    from launch.flops import peak_flops

    peak = peak_flops(torch.device("cuda"), "bf16")
    if peak is None:
        assert m["mfu"] is None
        return
    model, _, _ = load_checkpoint(out_dir)
    assert m["mfu"] == pytest.approx(model.flops_per_token() * m["tokens_per_s"] / peak, rel=1e-6)
    assert 0.001 < m["mfu"] < 1, m["mfu"]


# --- onnxruntime on CUDA ---------------------------------------------------------------------------------

def decode_joining(batch, seqs, joins: dict) -> None:
    """Step `batch` until every sequence is done, adding joins[step] before that step."""
    last = max(joins)
    for step in range(10_000):
        if step in joins:
            batch.add(joins[step])
        if not len(batch) and step > last:
            return
        batch.step()
    raise AssertionError("the batch did not finish")


@pytest.fixture(scope="module")
def cuda_runtime(export_dir):
    from serve.runtime import OnnxModel

    return OnnxModel(export_dir, device="cuda")


@needs_ort_cuda
def test_the_cuda_provider_is_really_active_and_the_cache_lives_on_the_gpu(cuda_runtime):
    assert cuda_runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    cache = cuda_runtime.empty_cache(2)
    assert all(v.device_name().lower() == "cuda" for v in cache)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    logits, present = cuda_runtime.run(ids, np.ones_like(ids), np.broadcast_to(np.arange(3), (2, 3)), cache)
    assert logits.shape == (2, 3, cuda_runtime.vocab_size) and np.isfinite(logits).all()
    assert all(v.device_name().lower() == "cuda" for v in present)


@needs_ort_cuda
def test_the_parity_grid_on_cuda_with_tf32_off(cuda_runtime, run_dir):
    from export.verify import FP32_TOLERANCE, parity_grid

    model, _, _ = load_checkpoint(run_dir)
    result = parity_grid(model, cuda_runtime)
    assert result["cases"] == 36 and result["passed"], result["max_rel_logit_error"]
    assert result["max_rel_logit_error"] <= FP32_TOLERANCE


@needs_ort_cuda
def test_cuda_generation_equals_cpu_batched_padded_and_joining_mid_decode(cuda_runtime, export_dir):
    from serve.batch import Sequence, make_batch
    from serve.generate import generate
    from serve.runtime import OnnxModel

    cpu = OnnxModel(export_dir, threads=1)
    prompts = ["ROMEO:", "O", "KING HENRY:\nWhat"]
    greedy = SamplingParams(greedy=True)

    def tokens(model, prompt):
        return list(generate(model, prompt, 80, greedy))[-1].sequence.generated

    singles = [tokens(cpu, p) for p in prompts]
    assert [tokens(cuda_runtime, p) for p in prompts] == singles
    events = list(generate(cuda_runtime, prompts, 80, greedy))  # one left-padded batch
    done = {e.sequence.tag: e.sequence.generated for e in events if e.finished}
    assert [done[i] for i in range(3)] == singles
    seqs = [Sequence(cuda_runtime.tokenizer.encode(p), 80, greedy) for p in prompts]
    decode_joining(make_batch(cuda_runtime), seqs, {0: seqs[:1], 10: seqs[1:2], 25: seqs[2:]})
    assert [s.generated for s in seqs] == singles


@needs_ort_cuda
def test_fp16_and_int8_on_cuda_are_finite_and_keep_the_validation_loss(run_dir, tmp_path):
    from export.pipeline import export
    from export.verify import validation_loss, validation_windows
    from gpt.checkpoint import resolve_checkpoint
    from serve.runtime import OnnxModel

    export(run_dir, tmp_path / "q", int8=True, fp16=True, log=lambda s: None)
    windows, why = validation_windows(resolve_checkpoint(run_dir), 32, 16)
    assert windows is not None, why
    base = validation_loss(OnnxModel(tmp_path / "q", device="cuda"), windows)
    for variant in ("fp16", "int8"):
        loss = validation_loss(OnnxModel(tmp_path / "q", device="cuda", variant=variant), windows)
        print(f"\n{variant} on CUDA: validation loss {loss:.4f} vs fp32 {base:.4f} ({loss - base:+.4f} nats)")
        assert np.isfinite(loss) and abs(loss - base) < 0.05


@pytest.fixture(scope="module")
def fused_fp16_export(run_dir, tmp_path_factory):
    from export.pipeline import export

    out = tmp_path_factory.mktemp("fused") / "fp16"
    export(run_dir, out, fp16=True, optimize=True, log=lambda s: None)
    return out


@needs_ort_cuda
def test_the_fused_fp16_graph_runs_on_cuda_with_its_cache_in_place_on_the_device(fused_fp16_export, run_dir):
    from export.verify import shared_parity_grid, validation_loss, validation_windows
    from gpt.checkpoint import resolve_checkpoint
    from serve.batch import Sequence, make_batch
    from serve.generate import generate
    from serve.runtime import OnnxModel

    runtime = OnnxModel(fused_fp16_export, device="cuda", variant="auto")
    assert runtime.variant == "fused-fp16" and runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    model, _, _ = load_checkpoint(run_dir)
    grid = shared_parity_grid(model, runtime)
    print(f"\nfused fp16 on CUDA vs PyTorch fp32: max |dlogits|/scale {grid['max_rel_logit_error']:.2e}")
    assert grid["max_rel_logit_error"] < 2e-2
    windows, why = validation_windows(resolve_checkpoint(run_dir), 32, 16)
    assert windows is not None, why
    base = validation_loss(OnnxModel(fused_fp16_export, variant="fp32"), windows)
    loss = validation_loss(runtime, windows)
    print(f"fused fp16 on CUDA: validation loss {loss:.4f} vs fp32 on CPU {base:.4f} ({loss - base:+.4f} nats)")
    assert abs(loss - base) < 0.02
    greedy = SamplingParams(greedy=True)
    prompts = ["ROMEO:", "O", "KING HENRY:\nWhat"]
    singles = [list(generate(runtime, p, 80, greedy))[-1].sequence.generated for p in prompts]
    batch = make_batch(runtime, slots=2)  # joins mid-decode; the third outgrows the two slots
    assert all(v.device_name().lower() == "cuda" for v in batch.buffers.values)
    seqs = [Sequence(runtime.tokenizer.encode(p), 80, greedy) for p in prompts]
    decode_joining(batch, seqs, {0: seqs[:1], 10: seqs[1:]})
    assert [s.generated for s in seqs] == singles


@needs_ort_cuda
def test_a_llamas_fused_fp16_graph_turns_queries_and_keys_on_cuda(tmp_path):
    """GroupQueryAttention's own rotary (do_rotary, cos and sin tables in fp16) on the CUDA provider: a
    tiny llama with 16-wide heads and 2 key/value heads for 4 against PyTorch fp32 over the parity grid,
    and a batch that sequences join mid-decode giving each one's tokens alone."""
    from bench.common import VOCAB
    from export.pipeline import export
    from export.verify import shared_parity_grid
    from gpt.checkpoint import write_model_files
    from gpt.config import RunConfig
    from gpt.tokenizer import CharTokenizer
    from serve.batch import Sequence, make_batch
    from serve.generate import generate
    from serve.runtime import OnnxModel

    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="llama", block_size=32, embedding_dim=64, num_heads=4, num_kv_heads=2,
                            num_layers=2, vocab_size=len(VOCAB), rope_theta=500.0)).eval()
    run = RunConfig()
    run.model = model.config
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", model, CharTokenizer(VOCAB), {"step": 0}, run.to_dict())
    export(tmp_path / "ckpt", tmp_path / "out", fp16=True, optimize=True, log=lambda s: None)
    runtime = OnnxModel(tmp_path / "out", device="cuda", variant="fused-fp16")
    assert runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    grid = shared_parity_grid(model, runtime)
    print(f"\nllama fused fp16 on CUDA vs PyTorch fp32: max |dlogits|/scale {grid['max_rel_logit_error']:.2e}")
    assert grid["max_rel_logit_error"] < 2e-2
    greedy = SamplingParams(greedy=True)
    prompts = ["ROMEO:", "O", "KING HENRY:\nWhat"]
    singles = [list(generate(runtime, p, 40, greedy))[-1].sequence.generated for p in prompts]
    batch = make_batch(runtime, slots=2)
    seqs = [Sequence(runtime.tokenizer.encode(p), 40, greedy) for p in prompts]
    decode_joining(batch, seqs, {0: seqs[:1], 10: seqs[1:]})
    assert [s.generated for s in seqs] == singles


@needs_ort_cuda
def test_the_http_server_on_cuda_serves_8_concurrent_streams_exactly(export_dir):
    import requests

    from conftest import free_port
    from serve.generate import generate
    from serve.runtime import OnnxModel

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.server", str(export_dir), "--port", str(port),
                             "--device", "cuda"], cwd=ROOT, env=subprocess_env(cuda=True),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not become healthy in 60 s"
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        runtime = OnnxModel(export_dir, device="cuda")
        results = {}

        def client(i):
            r = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 40, "seed": i,
                                                             "stream": True}, stream=True, timeout=120)
            lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")]
            results[i] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i in range(8):
            assert results[i] == "".join(e.text for e in generate(runtime, "ROMEO:", 40, SamplingParams(), i)), i
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- your own corpus on a GPU ------------------------------------------------------------------------------

def test_the_bpe_cpu_config_trains_in_bf16_on_cuda(tmp_path, fresh_accelerate):
    result = train(tmp_path, "--train.max_iters=100", "--train.eval_interval=100", "--train.log_interval=50",
                   "--train.mixed_precision=bf16", config=ROOT / "configs" / "shakespeare_bpe_cpu.yaml")
    m = result.metrics
    print(f"\nshakespeare_bpe_cpu, bf16, 100 steps: {m['tokens_per_s']:,.0f} tokens/s, val {m['val_loss']:.3f} "
          f"nats/token, {m['val_bpb']:.3f} bits/byte")
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # the step-0 evaluation
    # it learned: on the CPU in fp32 these 100 steps go from 4.45 to 3.02 bits/byte
    assert first["step"] == 0 and m["val_bpb"] < min(3.5, 0.8 * first["val_bpb"]), (first, m)


def test_gpt2_small_for_a_few_hundred_steps_reports_speed_and_mfu(tmp_path, fresh_accelerate):
    """GPT-2 small's shape on local text (TinyShakespeare with a learned 8,192-token BPE), 200 steps."""
    torch.cuda.reset_peak_memory_stats()
    corpus = CORPUS or resolve_corpus(DataConfig())
    started = time.perf_counter()
    result = train(tmp_path, f"--data.path={corpus}", "--data.vocab_size=8192", "--train.max_iters=200",
                   "--train.gradient_accumulation_steps=1", "--train.batch_size=16", "--train.warmup_iters=20",
                   "--train.eval_interval=200", "--train.eval_iters=5", "--train.checkpoint_interval=200",
                   "--train.log_interval=50", "--train.compile=false", config=ROOT / "configs" / "gpt2_small.yaml")
    m = result.metrics
    print(f"\ngpt2_small shape, bf16, {torch.cuda.get_device_name()}: {m['tokens_per_s']:,.0f} tokens/s, MFU "
          f"{m['mfu'] if m['mfu'] is None else format(m['mfu'], '.1%')}, peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, val {m['val_bpb']:.3f} bits/byte after 200 steps, "
          f"{time.perf_counter() - started:.0f} s")
    assert m["tokens_per_s"] > 0 and np.isfinite(m["val_loss"])
    assert_mfu(m, tmp_path)
