import numpy as np
import pytest

from gpt.sampling import SamplingParams, probabilities, refill_context, sample


def test_greedy_and_zero_temperature_take_the_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9])
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(greedy=True), rng) == 1
    assert sample(logits, SamplingParams(temperature=0.0), rng) == 1
    assert sample(logits, SamplingParams(top_k=1), rng) == 1


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    draws = np.bincount([sample(logits, SamplingParams(), rng) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = probabilities(logits, SamplingParams(top_k=2))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = probabilities(logits, SamplingParams(top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = probabilities(logits, SamplingParams(top_p=0.81))
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95)
    p = probabilities(logits, SamplingParams(temperature=2.0))
    expected = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(p, expected / expected.sum())


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).normal(size=65)
    a = [sample(logits, SamplingParams(top_p=0.9), np.random.default_rng(7)) for _ in range(5)]
    b = [sample(logits, SamplingParams(top_p=0.9), np.random.default_rng(7)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_refill_keeps_the_last_half_window():
    assert refill_context(list(range(9)), 8) == [5, 6, 7, 8]
    assert refill_context([1, 2], 1) == [2]


@pytest.mark.parametrize("vocab", [5, 3000, 50257])
def test_top_p_keeps_what_a_full_stable_sort_keeps(vocab):
    """most_likely_until sorts only a partition's candidates (growing them while they hold too little):
    the tokens kept, and their probabilities, are those of sorting every token."""
    from gpt.sampling import most_likely_until

    rng = np.random.default_rng(vocab)
    for scale in (0.5, 3.0):  # flat (the candidates must grow) and peaked
        p = np.exp(rng.standard_normal(vocab) * scale)
        p /= p.sum()
        for mass in (0.3, 0.9, 0.999):
            order, cumulative = most_likely_until(p, mass)
            full = np.argsort(-p, kind="stable")
            assert cumulative[-1] >= mass and np.array_equal(order, full[:len(order)])
            np.testing.assert_allclose(cumulative, np.cumsum(p[full])[:len(order)], rtol=1e-12)
