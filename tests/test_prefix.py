"""Prefix reuse (serve/prefix.py): prompt blocks already computed are copied into a new prompt's slot,
bounded, least recently used out, and change no token or logprob."""

import re

import numpy as np
import pytest
import requests

from gpt.sampling import SamplingParams
from serve.batch import Sequence, SlotBatch, make_batch
from serve.prefix import PrefixCache
from serve.runtime import OnnxModel


def buffers(slots=2, layers=2, heads=2, length=64, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((slots, heads, length, dim)).astype(np.float32) for _ in range(2 * layers)]


def test_a_block_is_restored_exactly_and_only_after_the_same_whole_prefix():
    cache, arrays = PrefixCache(1 << 20, block=4), buffers()
    a = list(range(10))  # blocks [0:4], [4:8]; the last 2 tokens are no whole block
    cache.store(a, arrays, slot=0)
    assert len(cache.entries) == 2 and cache.bytes == 2 * 4 * 2 * 4 * 4 * 4
    assert cache.restore(a, arrays, slot=1) == 8
    for x in arrays:
        np.testing.assert_array_equal(x[1, :, :8], x[0, :, :8])
    assert cache.restore(a[:8], arrays, 1) == 4  # the last token is always computed: one block of 8 tokens
    assert cache.restore([99, *a[1:]], arrays, 1) == 0  # the same second block after another first one
    assert cache.restore(a[:4] + [99] * 6, arrays, 1) == 4
    assert (cache.lookups, cache.hits, cache.tokens_reused) == (4, 3, 16)


def test_a_flood_of_distinct_prefixes_never_grows_the_cache_past_its_bound():
    arrays = buffers(length=64)
    entry = 2 * 2 * 2 * 4 * 4 * 4  # (2 * layers, heads, block, dim) float32
    cache = PrefixCache(10 * entry + entry // 2, block=4)
    rng = np.random.default_rng(1)
    for i in range(200):
        cache.store(rng.integers(0, 1000, int(rng.integers(1, 64))).tolist(), arrays, slot=i % 2)
        assert cache.bytes <= cache.max_bytes
    assert len(cache.entries) == 10 and cache.bytes == 10 * entry and cache.evictions > 100
    assert PrefixCache(entry - 1, block=4).store(list(range(8)), arrays, 0) is None  # too small for a block


def test_eviction_takes_the_least_recently_used_chain_from_its_end():
    entry_bytes = 2 * 2 * 2 * 4 * 4 * 4
    cache, arrays = PrefixCache(4 * entry_bytes, block=4), buffers()
    a, b, c = list(range(9)), list(range(100, 109)), list(range(200, 209))
    cache.store(a, arrays, 0)  # 2 blocks each
    cache.store(b, arrays, 0)
    assert cache.restore(a, arrays, 1) == 8  # a is now the most recently used
    cache.store(c, arrays, 0)  # 6 blocks for room of 4: b's two go, its second block first
    assert cache.evictions == 2
    assert (cache.restore(a, arrays, 1), cache.restore(b, arrays, 1), cache.restore(c, arrays, 1)) == (8, 0, 8)
    cache.store(list(range(300, 305)), arrays, 0)  # one more block: the least recent chain's end goes
    assert cache.restore(a, arrays, 1) == 4 and cache.restore(c, arrays, 1) == 8


def decode_one_at_a_time(runtime, prefix, prompts, new_tokens):
    """Each prompt decoded alone, one after another (as requests arriving in turn), with logprobs."""
    batch = SlotBatch(runtime, 2, prefix)
    out = []
    for p in prompts:
        s = Sequence(runtime.tokenizer.encode(p), new_tokens, SamplingParams(greedy=True), logprobs=3)
        batch.add([s])
        while len(batch):
            batch.step()
        out.append((s.generated, [(e.logprob, e.top) for e in s.entries]))
    return out


@pytest.mark.parametrize("variant", ["fused", "fused-int4"])
@pytest.mark.parametrize("new_tokens", [6, 40], ids=["within the window", "refilled past block_size"])
def test_reused_prefixes_give_the_same_tokens_and_logprobs(export_dir, new_tokens, variant):
    runtime = OnnxModel(export_dir, threads=1, variant=variant)
    header = "First Citizen:\nBefore "  # 22 characters: two whole blocks of 8 and part of a third
    prompts = [header + "we", header + "you", "ROMEO:", header + "we"]
    prefix = PrefixCache(1 << 20, block=8)
    assert decode_one_at_a_time(runtime, prefix, prompts, new_tokens) == decode_one_at_a_time(
        runtime, None, prompts, new_tokens)
    if new_tokens == 6:  # no refill: the second and fourth prompts found the header's two blocks
        assert (prefix.lookups, prefix.hits, prefix.tokens_reused) == (4, 2, 32)
    else:
        assert prefix.hits >= 2 and prefix.tokens_reused >= 32


def test_the_server_reuses_a_prefix_counts_it_and_answers_the_same(export_dir):
    from serve.generate import generate
    from test_server import start_server

    proc, url = start_server(export_dir)
    try:
        made = make_batch(OnnxModel(export_dir, threads=1, variant="fused"), slots=1, prefix_bytes=1 << 20).prefix
        assert made.block == 4  # blocks of an eighth of this model's 32 positions
        dynamic = OnnxModel(export_dir, threads=1, variant="fused-int8")  # scales a whole call's activations
        assert make_batch(dynamic, slots=1, prefix_bytes=1 << 20).prefix is None
        prompt = "First Citizen:\nBefore we"  # 24 tokens: 5 whole blocks of 4 before its last, 6 in all

        def count(name):
            return float(re.search(rf"^gpt_prefix_cache_{name} (\S+)$", requests.get(f"{url}/metrics").text,
                                   re.M).group(1))
        texts = [requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "seed": 3},
                               timeout=30).json()["choices"][0]["text"] for _ in range(2)]
        alone = OnnxModel(export_dir, threads=1, variant="auto")  # the runtime alone, no server, no reuse
        assert texts == ["".join(e.text for e in generate(alone, prompt, 5, SamplingParams(), 3))] * 2
        assert (count("lookups_total"), count("hits_total"), count("tokens_reused_total")) == (2, 1, 20)
        assert count("blocks") == 6 and count("bytes") > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, url = start_server(export_dir, "--prefix-cache-mb", "0")
    try:
        requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2}, timeout=30)
        assert "gpt_prefix_cache_lookups_total 0.0" in requests.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
