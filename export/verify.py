"""The gates every graph passes before it is written, and the quality figure of each variant.

    parity_grid()         a concat-cache graph against PyTorch: batch 1-3, past 0/1/5, sequence 1/4,
                          with and without left padding
    shared_parity_grid()  the fused graph against PyTorch, rows with the same or different pasts,
                          and the cache it wrote in place
    greedy_parity()       200 greedy tokens identical to PyTorch's
    validation_loss()     mean next-token loss over fixed windows of the run's held-out split (a token
                          budget, EVAL_TOKENS); torch_validation_loss() the PyTorch model's, the baseline

`require()` turns a failed gate into one ExportError line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.graph import example_inputs
from gpt.generate import generate as torch_generate
from gpt.model import GPT
from gpt.sampling import SamplingParams
from serve.manifest import ExportError
from serve.runtime import OnnxModel
from serve.runtime import generate as ort_generate

FP32_TOLERANCE = 1e-4  # max |Δlogits| / max |logits|
QUANTIZED_LOSS_WARNING = 0.05  # nats of validation loss
# the validation-loss gate: serve.manifest.EVAL_TOKENS held-out tokens in windows of at most EVAL_WINDOW
EVAL_WINDOW = 256


PARITY_GRID = [(b, p, t, pad) for b in (1, 2, 3) for p in (0, 1, 5) for t in (1, 4) for pad in (False, True)]


def parity_grid(model: GPT, runtime: OnnxModel) -> dict:
    """ORT against PyTorch over batch 1-3, past 0/1/5, sequence 1/4, with and without left padding."""
    worst, cases = 0.0, []
    for batch, past, seq, pad in PARITY_GRID:
        left_pad = min(2, past + seq - 1) if pad else 0
        ids, mask, positions, cache = example_inputs(model, batch, seq, past, left_pad, seed=len(cases))
        if pad and batch > 1:
            mask[0, :] = 1  # the first row unpadded, the others padded: a real mixed batch
            positions[0] = torch.arange(past, past + seq)
        with torch.no_grad():
            ref = model(ids, past=cache, attention_mask=mask, position_ids=positions, use_cache=True)
        host = [t.numpy() for kv in cache for t in kv]
        logits, present = runtime.run(ids.numpy(), mask.numpy(), positions.numpy(), runtime.to_device(host))
        scale = float(ref.logits.abs().max())
        err = float(np.abs(logits - ref.logits.numpy()).max()) / scale
        present_err = max(float(np.abs(p - t.numpy()).max()) for p, t in
                          zip(runtime.to_host(present), [t for kv in ref.present for t in kv]))
        worst = max(worst, err)
        cases.append({"batch": batch, "past": past, "sequence": seq, "left_padding": pad,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err})
    return {"cases": len(cases), "compared": compared(model, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": worst <= FP32_TOLERANCE, "grid": cases}


def compared(model: GPT, runtime: OnnxModel) -> str:
    """What a parity grid compared, in which precision: TF32 would blur a 1e-4 gate on a GPU."""
    precision = "fp16" if runtime.cache_dtype == np.float16 else "fp32"
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 and next(model.parameters()).is_cuda
    return (f"{precision}: onnxruntime {runtime.session.get_providers()[0]} (TF32 {'on' if runtime.tf32 else 'off'}) "
            f"vs PyTorch on {next(model.parameters()).device.type}{' (TF32 on)' if cuda_tf32 else ''}")


# GroupQueryAttention runs a prompt (no past) in a batch, one token after a past in a batch (rows may
# hold different numbers of tokens), and a chunk after a past for batch 1 only.
SHARED_GRID = [(b, p, t, ragged) for b, p, t, ragged in PARITY_GRID
               if (p == 0 and not ragged) or t == 1 or (b == 1 and not ragged)]


def shared_parity_grid(model: GPT, runtime: OnnxModel) -> dict:
    """The fused graph against PyTorch over batch 1-3, past 0/1/5, sequence 1/4 (SHARED_GRID), with
    every row holding the same number of cached tokens or different numbers (right padding, as its
    batches run): logits, and the cache the graph wrote in place."""
    c = model.config
    worst, cases = 0.0, []
    for batch, past, seq, ragged in SHARED_GRID:
        pasts = [past + (2 * r if ragged else 0) for r in range(batch)]
        g = torch.Generator().manual_seed(len(cases))
        ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
        host = [np.zeros((batch, c.num_heads, max(pasts), c.head_dim), np.float32) for _ in range(2 * c.num_layers)]
        width = max(pasts) + seq
        mask, positions = np.zeros((batch, width), np.int64), np.zeros((batch, seq), np.int64)
        refs = []
        for r, p in enumerate(pasts):
            cache = [(torch.randn(1, c.num_heads, p, c.head_dim, generator=g),
                      torch.randn(1, c.num_heads, p, c.head_dim, generator=g)) for _ in range(c.num_layers)]
            for j, t in enumerate(t for kv in cache for t in kv):
                host[j][r, :, :p] = t[0].numpy()
            mask[r, :p + seq] = 1
            positions[r] = np.arange(p, p + seq)
            with torch.no_grad():
                refs.append(model(ids[r:r + 1], past=cache, use_cache=True))
        logits, view = runtime.run(ids.numpy(), mask, positions, runtime.to_device(host))
        written = runtime.to_host(view)
        err = present_err = 0.0
        for r, (p, ref) in enumerate(zip(pasts, refs)):
            err = max(err, float(np.abs(logits[r] - ref.logits[0].numpy()).max()) / float(ref.logits.abs().max()))
            for a, t in zip(written, [t for kv in ref.present for t in kv]):
                present_err = max(present_err, float(np.abs(a[r, :, :p + seq] - t[0].numpy()).max()))
        worst = max(worst, err)
        cases.append({"batch": batch, "past": past, "sequence": seq, "ragged": ragged,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err})
    passed = worst <= FP32_TOLERANCE and max(c["max_abs_cache_error"] for c in cases) <= FP32_TOLERANCE * 10
    return {"cases": len(cases), "compared": compared(model, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": passed, "grid": cases}


def greedy_parity(model: GPT, runtime: OnnxModel, tokens: int = 200) -> dict:
    """200 greedy tokens from onnxruntime, identical to PyTorch's (computed once per model and prompt)."""
    prompt = runtime.tokenizer.decode([i % runtime.vocab_size for i in range(1, 9)])
    ids = runtime.tokenizer.encode(prompt)
    key = (tuple(ids), tokens, runtime.tokenizer.eot_id)
    if getattr(model, "_greedy_reference", (None,))[0] != key:
        model._greedy_reference = (key, list(torch_generate(model, ids, tokens, SamplingParams(greedy=True),
                                                            eot_id=runtime.tokenizer.eot_id)))
    ref = model._greedy_reference[1]
    events = list(ort_generate(runtime, prompt, tokens, SamplingParams(greedy=True)))
    got = events[-1].sequence.generated
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    return {"tokens": tokens, "identical": ref == got, "first_difference": first}


def validation_loss(runtime: OnnxModel, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy of an ONNX graph over fixed validation windows (N, T+1), one
    window per call, so the logits held at once are one window's (T x vocab)."""
    total = 0.0
    for window in windows:
        x, y = window[None, :-1], window[None, 1:]
        T = x.shape[1]
        logits, _ = runtime.run(np.ascontiguousarray(x), np.ones((1, T), np.int64), np.arange(T)[None],
                                runtime.empty_cache(1))
        total += _nll(logits[0], y[0])
    return float(total / windows[:, 1:].size)


@torch.no_grad()
def torch_validation_loss(model: GPT, windows: np.ndarray) -> float:
    """The same figure from the PyTorch model, which every fp32 graph matches: the baseline each
    variant's change is measured against."""
    total = 0.0
    for window in windows:
        total += _nll(model(torch.from_numpy(np.ascontiguousarray(window[None, :-1]))).logits[0].numpy(), window[1:])
    return float(total / windows[:, 1:].size)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-token negative log-likelihood of (T, vocab) logits: logsumexp minus the target's
    logit, accumulated in float64 per row."""
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1, dtype=np.float64)) + top[:, 0]
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def validation_windows(checkpoint: Path, block_size: int, tokens: int) -> tuple[np.ndarray | None, str]:
    """About `tokens` held-out tokens in fixed windows of min(block_size, EVAL_WINDOW), spread over
    the run's held-out split; or None and the reason it is unavailable. A token budget rather than
    windows of block_size keeps the gate's cost the same from the seed size to GPT-2 large."""
    from gpt.checkpoint import CheckpointError, read_run_config
    from gpt.config import DataConfig
    from gpt.data import DataError, prepare

    try:
        data = DataConfig(**read_run_config(checkpoint)["data"])
        corpus = prepare(data)
    except (CheckpointError, DataError, OSError, TypeError, KeyError) as e:
        return None, f"held-out data unavailable ({str(e).splitlines()[0][:200]})"
    val, width = corpus.val, min(block_size, EVAL_WINDOW)
    if len(val) <= width + 1:
        return None, f"held-out split has {len(val)} tokens, too few for one window"
    starts = np.linspace(0, len(val) - width - 1, max(1, tokens // width)).astype(np.int64)
    return np.stack([np.asarray(val[s:s + width + 1], dtype=np.int64) for s in starts]), ""


def require(parity: dict, greedy: dict, graph: str, fix: str) -> None:
    """The two gates every graph passes before it is written."""
    if not parity["passed"]:
        raise ExportError(f"{graph} and PyTorch disagree: max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} > "
                          f"{FP32_TOLERANCE:.0e}; {fix}")
    if not greedy["identical"]:
        raise ExportError(f"{graph}'s greedy decoding differs from PyTorch at token {greedy['first_difference']} of "
                          f"{greedy['tokens']}; {fix}")

