import pytest
import torch

from gpt.config import ModelConfig
from gpt.generate import generate, generate_uncached
from gpt.model import GPT
from gpt.sampling import SamplingParams


def tiny(block_size=16, dropout=0.0, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(block_size=block_size, embedding_dim=32, num_heads=4, num_layers=2, dropout=dropout,
                           vocab_size=65)).eval()


def test_shapes_and_loss():
    model = tiny()
    x = torch.randint(0, 65, (3, 10))
    out = model(x, targets=x)
    assert out.logits.shape == (3, 10, 65)
    assert out.loss.shape == () and 3.5 < out.loss.item() < 5.0  # ~ln(65)=4.17 at init
    assert out.present is None
    out = model(x, use_cache=True)
    assert len(out.present) == 2 and out.present[0][0].shape == (3, 4, 10, 8)


def test_chunked_prefill_with_past_matches_full_sequence():
    """Chunks of queries against a past: each sees the past and its chunk up to itself. (SDPA's is_causal
    aligns its triangle top-left, which would hide part of the past: the mask is built from positions.)"""
    model = tiny()
    x = torch.randint(0, 65, (2, 16))
    full = model(x).logits
    a = model(x[:, :5], use_cache=True)
    b = model(x[:, 5:11], past=a.present)  # a chunk of 6 queries against a past of 5
    c = model(x[:, 11:], past=b.present)
    torch.testing.assert_close(torch.cat([a.logits, b.logits, c.logits], 1), full, atol=1e-5, rtol=0)


def test_one_token_decoding_matches_full_sequence():
    model = tiny()
    x = torch.randint(0, 65, (1, 12))
    out = model(x[:, :1], use_cache=True)
    steps = [out.logits]
    for t in range(1, 12):
        out = model(x[:, t:t + 1], past=out.present)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), model(x).logits, atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded():
    model = tiny()
    a, b = torch.randint(0, 65, (1, 9)), torch.randint(0, 65, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1)]).long()
    out = model(batch, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits[0], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1, 5:], model(b).logits[0], atol=1e-5, rtol=0)
    nxt = torch.randint(0, 65, (2, 1))
    step = model(nxt, past=out.present, attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1))
    torch.testing.assert_close(step.logits[1, 0], model(torch.cat([b, nxt[1:]], 1)).logits[0, -1], atol=1e-5, rtol=0)
    assert torch.isfinite(step.logits).all()


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="exceed block_size=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("params", [SamplingParams(greedy=True), SamplingParams(temperature=0.9, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_cached_generation_equals_uncached_past_block_size(params):
    model = tiny(block_size=16)
    prompt = [1, 2, 3, 4, 5]
    n = 3 * 16  # three windows: the refill policy is exercised several times
    cached = list(generate(model, prompt, n, params, seed=3))
    uncached = list(generate_uncached(model, prompt, n, params, seed=3))
    assert len(cached) == n and cached == uncached


@pytest.mark.parametrize("block", [16, 64], ids=["refilled", "one-window"])
def test_greedy_gate_checks_decoded_tokens_in_one_forward_per_window(block):
    """export.verify.greedy_agreement: PyTorch's own greedy tokens pass, past block_size too (the
    windows refilled as generate() refills them); a changed token, or an early end, is found where it is."""
    from export.verify import greedy_agreement

    model = tiny(block_size=block)
    gate = {"prompt": "", "ids": [1, 2, 3, 4, 5, 6, 7, 8], "tokens": 50, "stop": []}
    tokens = list(generate(model, gate["ids"], 50, SamplingParams(greedy=True)))
    assert greedy_agreement(model, gate, tokens) == {"tokens": 50, "identical": True, "first_difference": None}
    for at in (0, 13, 31, 49):
        wrong = tokens[:at] + [(tokens[at] + 1) % 65] + tokens[at + 1:]
        assert greedy_agreement(model, gate, wrong)["first_difference"] == at
    assert greedy_agreement(model, gate, tokens[:40])["first_difference"] == 40  # stopped with no stop token
    stop = {**gate, "stop": [tokens[39]]}  # a stop token ends it where generate() ends it
    assert greedy_agreement(model, stop, tokens[:40])["first_difference"] == \
        (None if tokens[39] not in tokens[:39] else tokens.index(tokens[39]) + 1)


def test_generation_is_seeded():
    model = tiny()
    params = SamplingParams(temperature=1.0)
    assert list(generate(model, [1], 20, params, seed=1)) == list(generate(model, [1], 20, params, seed=1))
    assert list(generate(model, [1], 20, params, seed=1)) != list(generate(model, [1], 20, params, seed=2))


def test_overfits_one_batch():
    model = tiny(block_size=16).train()
    x = torch.randint(0, 65, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_dropout_is_off_in_eval():
    model = tiny(dropout=0.5)
    x = torch.randint(0, 65, (1, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits)


def test_parameter_count_and_flops():
    model = tiny()
    c = model.config
    per_block = 12 * c.embedding_dim ** 2 + 13 * c.embedding_dim  # qkv, proj, fc, proj weights+biases, 2 LN
    expected = c.vocab_size * c.embedding_dim * 2 + c.num_layers * per_block + 2 * c.embedding_dim
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_positions=False) == expected + c.block_size * c.embedding_dim
    assert model.flops_per_token() == 6 * expected + 12 * c.num_layers * c.embedding_dim * c.block_size
