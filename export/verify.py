"""The gates every graph passes before it is written, and the quality figure of each variant.

    parity_grid()         a concat-cache graph against PyTorch: batch 1-3, past 0/1/5, sequence 1/4,
                          with and without left padding (and a sequence's last position alone, as a
                          prefill asks for it)
    shared_parity_grid()  the fused graph against PyTorch, rows with the same or different pasts,
                          and the cache it wrote in place
    greedy_agreement()    a graph's 200 greedy tokens (greedy_run()) are PyTorch's: PyTorch's argmax
                          after each prefix of them is the next one, one forward per context window
    validation_loss()     mean next-token loss over fixed windows of the run's held-out split (a token
                          budget, EVAL_TOKENS); torch_validation_loss() the PyTorch model's, the baseline

Each gate compares a graph with what PyTorch computed for the same inputs: its `*_reference()` runs
the model once and keeps only its outputs (the inputs are seeded, so they are made again for each
graph). The export computes every reference first and releases the model before it opens a single
onnxruntime session; the gates also take the model itself, and then compute the reference first.
The greedy gate runs the other way round: each graph decodes first, and once every session is
closed the model is loaded again to check the tokens in a few forwards (200 decode steps of a
135M-parameter model in PyTorch took 15 s; the check takes about 1).
`require_parity()` and `require_greedy()` turn a failed gate into one ExportError line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.graph import example_inputs
from gpt.model import GPT
from gpt.sampling import SamplingParams, refill_context
from gpt.tokenizer import stop_ids
from serve.generate import generate as ort_generate
from serve.manifest import ExportError
from serve.runtime import OnnxModel

FP32_TOLERANCE = 1e-4  # max |Δlogits| / max |logits|
QUANTIZED_LOSS_WARNING = 0.05  # nats of validation loss
# the validation-loss gate: serve.manifest.EVAL_TOKENS held-out tokens in windows of at most EVAL_WINDOW
EVAL_WINDOW = 256


PARITY_GRID = [(b, p, t, pad) for b in (1, 2, 3) for p in (0, 1, 5) for t in (1, 4) for pad in (False, True)]


def _parity_case(config, index: int):
    """The inputs of PARITY_GRID[index]: the first row unpadded and the others left-padded, when padded."""
    batch, past, seq, pad = PARITY_GRID[index]
    left_pad = min(2, past + seq - 1) if pad else 0
    ids, mask, positions, cache = example_inputs(config, batch, seq, past, left_pad, seed=index)
    if pad and batch > 1:
        mask[0, :] = 1  # the first row unpadded, the others padded: a real mixed batch
        positions[0] = torch.arange(past, past + seq)
    return ids, mask, positions, cache


@torch.no_grad()
def parity_reference(model: GPT) -> dict:
    """PyTorch's logits and new cache entries over PARITY_GRID. The cases of one (past, sequence) run
    as one batch, their rows side by side (each row is computed alone: its own mask, no mixing), so
    the model's weights are read once per shape rather than once per case."""
    cases: list = [None] * len(PARITY_GRID)
    for past, seq in dict.fromkeys((p, t) for _, p, t, _ in PARITY_GRID):
        indices = [i for i, (_, p, t, _) in enumerate(PARITY_GRID) if (p, t) == (past, seq)]
        inputs = [_parity_case(model.config, i) for i in indices]
        ids, mask, positions = (torch.cat([case[j] for case in inputs]) for j in range(3))
        cache = [tuple(torch.cat([case[3][layer][s] for case in inputs]) for s in range(2))
                 for layer in range(model.config.num_layers)]
        ref = model(ids, past=cache, attention_mask=mask, position_ids=positions, use_cache=True)
        rows = np.cumsum([0] + [len(case[0]) for case in inputs])
        for i, start, end in zip(indices, rows[:-1], rows[1:]):
            new = [t[start:end, :, past:].numpy() for kv in ref.present for t in kv]
            cases[i] = (ref.logits[start:end].numpy(), new)
    return {"torch": torch_side(model), "config": model.config, "cases": cases}


def parity_grid(reference: dict | GPT, runtime: OnnxModel) -> dict:
    """ORT against PyTorch over batch 1-3, past 0/1/5, sequence 1/4, with and without left padding."""
    reference = parity_reference(reference) if isinstance(reference, GPT) else reference
    worst, cases = 0.0, []
    for index, (batch, past, seq, pad) in enumerate(PARITY_GRID):
        ids, mask, positions, cache = _parity_case(reference["config"], index)
        ref_logits, ref_new = reference["cases"][index]
        host = [t.numpy() for kv in cache for t in kv]
        logits, present = runtime.run(ids.numpy(), mask.numpy(), positions.numpy(), runtime.to_device(host))
        err = float(np.abs(logits - ref_logits).max()) / float(np.abs(ref_logits).max())
        present_err = max(float(np.abs(p - np.concatenate([h, new], axis=2)).max())
                          for p, h, new in zip(runtime.to_host(present), host, ref_new))
        last = last_only_error(runtime, (ids.numpy(), mask.numpy(), positions.numpy()), lambda: runtime.to_device(host),
                               ref_logits[:, -1])
        worst = max(worst, err, last or 0.0)
        cases.append({"batch": batch, "past": past, "sequence": seq, "left_padding": pad,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err, "last_only_error": last})
    return {"cases": len(cases), "compared": compared(reference, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": worst <= FP32_TOLERANCE, "grid": cases}


def last_only_error(runtime: OnnxModel, inputs: tuple, cache, ref_last: np.ndarray) -> float | None:
    """The last position's logits alone (`last_only`, as a prefill asks for them), against PyTorch's
    (B, V); None where that is every position already (one token, or a traced graph)."""
    if inputs[0].shape[1] == 1 or not runtime.keeps_logits:
        return None
    logits, _ = runtime.run(*inputs, cache(), last_only=True)
    return float(np.abs(logits[:, -1] - ref_last).max()) / float(np.abs(ref_last).max())


def torch_side(model: GPT) -> str:
    """Where the references ran: TF32 would blur a 1e-4 gate on a GPU."""
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 and next(model.parameters()).is_cuda
    return f"PyTorch on {next(model.parameters()).device.type}{' (TF32 on)' if cuda_tf32 else ''}"


def compared(reference: dict, runtime: OnnxModel) -> str:
    """What a parity grid compared, in which precision."""
    precision = "fp16" if runtime.cache_dtype == np.float16 else "fp32"
    return (f"{precision}: onnxruntime {runtime.session.get_providers()[0]} (TF32 {'on' if runtime.tf32 else 'off'}) "
            f"vs {reference['torch']}")


# GroupQueryAttention runs a prompt (no past) in a batch, one token after a past in a batch (rows may
# hold different numbers of tokens), and a chunk after a past for batch 1 only.
SHARED_GRID = [(b, p, t, ragged) for b, p, t, ragged in PARITY_GRID
               if (p == 0 and not ragged) or t == 1 or (b == 1 and not ragged)]


def _shared_case(c, index: int):
    """The inputs of SHARED_GRID[index]: each row's past (2 more tokens per row when ragged) and its
    cache, written into one shared buffer of the longest past, as the fused graph's batches run."""
    batch, past, seq, ragged = SHARED_GRID[index]
    pasts = [past + (2 * r if ragged else 0) for r in range(batch)]
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
    host = [np.zeros((batch, c.kv_heads, max(pasts), c.head_dim), np.float32) for _ in range(2 * c.num_layers)]
    mask, positions = np.zeros((batch, max(pasts) + seq), np.int64), np.zeros((batch, seq), np.int64)
    rows = []
    for r, p in enumerate(pasts):
        cache = [(torch.randn(1, c.kv_heads, p, c.head_dim, generator=g),
                  torch.randn(1, c.kv_heads, p, c.head_dim, generator=g)) for _ in range(c.num_layers)]
        for j, t in enumerate(t for kv in cache for t in kv):
            host[j][r, :, :p] = t[0].numpy()
        mask[r, :p + seq] = 1
        positions[r] = np.arange(p, p + seq)
        rows.append(cache)
    return pasts, ids, mask, positions, host, rows


@torch.no_grad()
def shared_reference(model: GPT) -> dict:
    """PyTorch's logits and new cache entries for each row of SHARED_GRID, each row alone (rows of
    the same past and sequence length, from any case, side by side in one batch)."""
    rows = {}  # (past, sequence) -> [(case, row, ids, cache)]
    for index in range(len(SHARED_GRID)):
        pasts, ids, _, _, _, caches = _shared_case(model.config, index)
        for r, (p, cache) in enumerate(zip(pasts, caches)):
            rows.setdefault((p, ids.shape[1]), []).append((index, r, ids[r:r + 1], cache))
    cases = [[] for _ in SHARED_GRID]
    for (past, _), group in rows.items():
        cache = [tuple(torch.cat([g[3][layer][s] for g in group]) for s in range(2))
                 for layer in range(model.config.num_layers)]
        ref = model(torch.cat([g[2] for g in group]), past=cache, use_cache=True)
        for j, (index, r, _, _) in enumerate(group):
            new = [t[j, :, past:].numpy() for kv in ref.present for t in kv]
            cases[index].append((r, (ref.logits[j].numpy(), new)))
    cases = [[entry for _, entry in sorted(case, key=lambda e: e[0])] for case in cases]
    return {"torch": torch_side(model), "config": model.config, "cases": cases}


def shared_parity_grid(reference: dict | GPT, runtime: OnnxModel) -> dict:
    """The fused graph against PyTorch over batch 1-3, past 0/1/5, sequence 1/4 (SHARED_GRID), with
    every row holding the same number of cached tokens or different numbers (right padding, as its
    batches run): logits, and the cache the graph wrote in place."""
    reference = shared_reference(reference) if isinstance(reference, GPT) else reference
    worst, cases = 0.0, []
    for index, (batch, past, seq, ragged) in enumerate(SHARED_GRID):
        pasts, ids, mask, positions, host, _ = _shared_case(reference["config"], index)
        # buffers as long as the case needs, not block_size: at GPT-2 sizes those would be 0.2 GB per batch
        logits, view = runtime.run(ids.numpy(), mask, positions, runtime.to_device(host, length=mask.shape[1]))
        written = runtime.to_host(view)
        err = present_err = 0.0
        for r, (p, (ref_logits, ref_new)) in enumerate(zip(pasts, reference["cases"][index])):
            err = max(err, float(np.abs(logits[r] - ref_logits).max()) / float(np.abs(ref_logits).max()))
            for a, h, new in zip(written, host, ref_new):
                expected = np.concatenate([h[r, :, :p], new], axis=1)
                present_err = max(present_err, float(np.abs(a[r, :, :p + seq] - expected).max()))
        last = last_only_error(runtime, (ids.numpy(), mask, positions),
                               lambda: runtime.to_device(host, length=mask.shape[1]),
                               np.stack([ref_logits[-1] for ref_logits, _ in reference["cases"][index]]))
        worst = max(worst, err, last or 0.0)
        cases.append({"batch": batch, "past": past, "sequence": seq, "ragged": ragged,
                      "max_rel_logit_error": err, "max_abs_cache_error": present_err, "last_only_error": last})
    passed = worst <= FP32_TOLERANCE and max(c["max_abs_cache_error"] for c in cases) <= FP32_TOLERANCE * 10
    return {"cases": len(cases), "compared": compared(reference, runtime), "max_rel_logit_error": worst,
            "tolerance": FP32_TOLERANCE, "passed": passed, "grid": cases}


def greedy_prompt(tokenizer, vocab_size: int, tokens: int = 200) -> dict:
    """The greedy gate's fixed prompt (ids 1..8 of the vocabulary, decoded) and its length."""
    prompt = tokenizer.decode([i % vocab_size for i in range(1, 9)])
    return {"prompt": prompt, "ids": tokenizer.encode(prompt), "tokens": tokens, "stop": sorted(stop_ids(tokenizer))}


def greedy_run(gate: dict, runtime: OnnxModel) -> list[int]:
    """A graph's greedy continuation of the gate's prompt, decoded as users decode (serve.generate)."""
    events = list(ort_generate(runtime, gate["prompt"], gate["tokens"], SamplingParams(greedy=True)))
    return events[-1].sequence.generated


@torch.no_grad()
def greedy_agreement(model: GPT, gate: dict, generated: list[int]) -> dict:
    """Whether PyTorch's greedy decoding (gpt.generate) of the gate's prompt gives `generated`, checked
    in one forward per context window instead of one per token: PyTorch's argmax after each prefix
    must be the next token of `generated`, so by induction its greedy continuation is `generated`,
    to the same stop. The windows are the ones generate() decodes in: the prompt's last block_size
    tokens, refilled with the last half of the window whenever it is full (gpt.sampling.refill_context)."""
    block = model.config.block_size
    stream = list(gate["ids"][-block:]) + list(generated)
    first = len(stream) - len(generated)  # generated[i] is predicted from stream[start:first + i]
    starts, start = [], 0
    for i in range(len(generated)):
        if first + i - start > block:  # the window is full: generate() keeps what refill_context keeps
            start = first + i - len(refill_context(stream[start:first + i], block))
        starts.append(start)
    predicted = []
    for start in dict.fromkeys(starts):
        steps = [i for i, s in enumerate(starts) if s == start]
        window = torch.tensor([stream[start:first + steps[-1]]])
        logits = model(window).logits[0].float().numpy()  # (T, vocab): each position's next token
        predicted += [int(np.argmax(logits[first + i - 1 - start])) for i in steps]
    first_difference = next((i for i, (a, b) in enumerate(zip(predicted, generated)) if a != b), None)
    stopped = next((i + 1 for i, t in enumerate(generated) if t in gate["stop"]), None)  # PyTorch ends there
    if stopped is not None and stopped < len(generated):
        first_difference = min(stopped, first_difference if first_difference is not None else stopped)
    ended = len(generated) == gate["tokens"] or stopped == len(generated)
    if first_difference is None and not ended:
        first_difference = len(generated)  # stopped where PyTorch would have gone on
    return {"tokens": gate["tokens"], "identical": first_difference is None, "first_difference": first_difference}


def references(model: GPT, tokenizer, shared: bool, checkpoint: Path, eval_tokens: int) -> dict:
    """PyTorch's side of every gate, computed once, so that the model can be released before the first
    graph is opened: the parity grids (the shared-cache one when `shared`), the greedy gate's prompt
    (PyTorch checks the graphs' tokens after them: greedy_agreement()), and the validation loss on
    `eval_tokens` held-out tokens (none when 0) with the windows it used."""
    windows, why = validation_windows(checkpoint, model.config.block_size, eval_tokens) if eval_tokens else (None, "")
    return {"parity": parity_reference(model), "shared": shared_reference(model) if shared else None,
            "greedy": greedy_prompt(tokenizer, model.config.vocab_size), "windows": windows, "why": why,
            "val_loss": torch_validation_loss(model, windows) if windows is not None else None}


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
        if data.format == "chat":  # the held-out conversations, one after another
            from gpt.sft import prepare_chat
            from gpt.tokenizer import load_tokenizer

            rows = prepare_chat(data, block_size, load_tokenizer(checkpoint / "tokenizer.json")).val
            val = rows.tokens[rows.documents >= 0]
        else:
            val = prepare(data).val
    except (CheckpointError, DataError, OSError, TypeError, KeyError) as e:
        return None, f"held-out data unavailable ({str(e).splitlines()[0][:200]})"
    width = min(block_size, EVAL_WINDOW)
    if len(val) <= width + 1:
        return None, f"held-out split has {len(val)} tokens, too few for one window"
    starts = np.linspace(0, len(val) - width - 1, max(1, tokens // width)).astype(np.int64)
    return np.stack([np.asarray(val[s:s + width + 1], dtype=np.int64) for s in starts]), ""


def require_parity(parity: dict, graph: str, fix: str) -> None:
    """The parity grid's gate: a graph whose logits stray past the tolerance is not written."""
    if not parity["passed"]:
        raise ExportError(f"{graph} and PyTorch disagree: max |Δlogits|/scale {parity['max_rel_logit_error']:.2e} > "
                          f"{FP32_TOLERANCE:.0e}; {fix}")


def require_greedy(greedy: dict, graph: str, fix: str) -> None:
    """The greedy gate: a graph whose greedy tokens are not PyTorch's is not written."""
    if not greedy["identical"]:
        raise ExportError(f"{graph}'s greedy decoding differs from PyTorch at token {greedy['first_difference']} of "
                          f"{greedy['tokens']}; {fix}")
