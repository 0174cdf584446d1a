"""Judging a model from outside: logprobs and echo in the API, serve.evaluate, /metrics, the tokenizer
endpoints, and clients no one here wrote (the openai SDK, lm-evaluation-harness, prometheus_client)."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch

from conftest import ROOT, require, shakespeare, subprocess_env
from gpt.checkpoint import load_checkpoint
from gpt.sampling import SamplingParams, log_softmax, penalize
from serve.evaluate import evaluate, scored_text
from serve.runtime import OnnxModel
from serve.scoring import Scorer
from test_server import complete, start_server

TEXT = shakespeare()[:3000]


@pytest.fixture(scope="module")
def server(export_dir):
    """The char model's server, on its default (fused) graph."""
    proc, url = start_server(export_dir)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bpe_server(bpe_export_dir):
    proc, url = start_server(bpe_export_dir, "--model", "fp32")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# --- scoring: rolling windows equal to the PyTorch model's own log-probabilities --------------------

@pytest.mark.parametrize("stride", [None, 8])
def test_rolling_windows_score_each_token_once_as_pytorch_does(run_dir, export_dir, stride):
    model, tokenizer, _ = load_checkpoint(run_dir)
    T = model.config.block_size
    ids = tokenizer.encode(TEXT[:100])  # 100 tokens: several windows of 32
    scores = Scorer(OnnxModel(export_dir, threads=1)).score(ids, stride=stride)
    assert scores.logprobs.shape == (99,)
    expected = np.zeros(99)
    step, scored, start = stride or T, 0, 0
    while scored < 99:  # the windows written out by hand, each read by PyTorch from position 0
        end = min(start + T, 99)
        first = max(0, end - T)  # the last one reads a whole window too
        with torch.no_grad():
            logits = model(torch.tensor([ids[first:end]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for t in range(scored + 1, end + 1):
            expected[t - 1] = lp[t - first - 1, ids[t]].item()
        scored, start = end, start + step
    np.testing.assert_allclose(scores.logprobs, expected, rtol=1e-4, atol=1e-5)


def test_the_fused_graph_scores_as_the_portable_one(export_dir):
    ids = OnnxModel(export_dir).tokenizer.encode(TEXT[:300])
    portable = Scorer(OnnxModel(export_dir, threads=1)).score(ids, top=3)
    fused = Scorer(OnnxModel(export_dir, threads=1, variant="fused")).score(ids, top=3)
    np.testing.assert_allclose(fused.logprobs, portable.logprobs, atol=1e-4)
    np.testing.assert_array_equal(fused.top_ids[:, 0], portable.top_ids[:, 0])
    assert fused.top_ids.shape == (len(ids) - 1, 3)


def test_penalize_is_openais_formula_and_log_softmax_is_pytorchs():
    logits, counts = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 3.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(penalize(logits, counts, params), [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5])
    with pytest.raises(ValueError, match="frequency_penalty=3"):
        SamplingParams(frequency_penalty=3)
    wide = np.array([[-1e4, 0.0, 30.0, 1e-3], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_allclose(log_softmax(wide), torch.log_softmax(torch.tensor(wide), -1).numpy(), rtol=1e-12)


# --- serve.evaluate ----------------------------------------------------------------------------------

def test_evaluate_command_scores_every_variant_without_torch(export_dir, text_file, tmp_path):
    out = tmp_path / "figures.json"
    code = ("import sys, runpy; sys.modules['torch'] = None\n"
            f"sys.argv = ['evaluate', {str(export_dir)!r}, '--text', {str(text_file)!r}, '--json', {str(out)!r}, "
            "'--threads', '1']\n"
            "try:\n    runpy.run_module('serve.evaluate', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:3] == ["model", "tokens", "nats/token"]
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert list(variants)[0] == "fp32" and set(variants) == set(json.loads((export_dir / "manifest.json").read_text())
                                                                 ["files"])
    fp32 = variants["fp32"]
    assert fp32["tokens"] == len(TEXT) - 1 and fp32["bytes"] == len(TEXT[1:].encode())  # a char model
    assert math.isclose(fp32["perplexity"], math.exp(fp32["nats_per_token"]))
    assert math.isclose(fp32["bits_per_byte"], fp32["nats"] / math.log(2) / fp32["bytes"])
    assert abs(variants["fused"]["change_nats_per_token"]) < 1e-4
    assert abs(variants["int4"]["change_nats_per_token"]) < 0.1 and variants["int4"]["tokens_per_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "serve.evaluate", str(export_dir), "--text", str(text_file),
                          "--model", "int3"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--model int3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# --- the API: echo and logprobs are the model's own, and equal serve.evaluate's -----------------------

@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_echo_with_logprobs_gives_what_serve_evaluate_gives(bpe_server, bpe_export_dir, text_file, variant):
    """The whole text scored over the API (rolling windows past the model's), for the default graph and int4:
    the same total as serve.evaluate's, which lm-eval is held to below."""
    if variant == "fp32":
        url, proc = bpe_server
    else:
        proc, url = start_server(bpe_export_dir, "--model", variant)
    try:
        _echo_equals_evaluate(url, bpe_export_dir, text_file, variant)
    finally:
        if variant != "fp32":
            proc.terminate()
            proc.wait(timeout=10)


def _echo_equals_evaluate(url, bpe_export_dir, text_file, variant):
    report = evaluate(bpe_export_dir, str(text_file), variant, log=lambda s: None)["variants"][variant]
    tokenizer = OnnxModel(bpe_export_dir).tokenizer
    ids, _ = scored_text(tokenizer, TEXT)
    assert len(ids) > 4 * 32  # longer than the model's window: scored in rolling windows
    body = complete(url, prompt=ids, max_tokens=0, echo=True, logprobs=1).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(ids) and body["usage"]["completion_tokens"] == 0
    total = -sum(logprobs["token_logprobs"][1:])
    assert math.isclose(total, report["nats"], rel_tol=1e-6), (total, report["nats"])
    assert body["choices"][0]["text"] == TEXT and logprobs["tokens"][0] == "<|endoftext|>"
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


@pytest.mark.parametrize("text", ["ROMEO: But soft, what light", "Café ☕ and naïve crème brûlée"],
                         ids=["whole characters", "characters split across tokens"])
def test_echo_lists_built_from_the_vocabulary_table_equal_token_by_token_ones(bpe_export_dir, text):
    """prompt_logprobs builds its lists from arrays of the vocabulary; a token that is part of a
    character sends the prompt through a stream decoder. Either way: the lists built one token at a time."""
    from serve.batch import Sequence
    from serve.protocol import prompt_logprobs
    from serve.scoring import token_text

    model = OnnxModel(bpe_export_dir, threads=1)
    tokenizer = model.tokenizer
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    decoder = tokenizer.stream()
    pieces = [decoder.feed(t) for t in ids]
    split = any(p == "" for p in pieces[1:])
    assert split == ("Café" in text)  # the case this parameter is meant to be
    for top in (0, 1, 3):
        s = Sequence(ids, 0, logprobs=top, score_prompt=True)
        s.prompt_scores = Scorer(model).score_many([ids], top=top)[0]
        echoed, lists = prompt_logprobs(tokenizer, s)
        assert echoed == "".join(pieces) + decoder.flush() == text
        assert lists["text_offset"] == [sum(map(len, pieces[:i])) for i in range(len(ids))]
        assert lists["tokens"] == [token_text(tokenizer, t) for t in ids]
        lp = s.prompt_scores.logprobs.tolist()
        assert lists["token_logprobs"] == [None, *lp]
        expected = [{token_text(tokenizer, int(t)): float(v) for t, v in zip(row_ids, row_lp)}
                    for row_ids, row_lp in zip(s.prompt_scores.top_ids, s.prompt_scores.top_logprobs)] if top else \
            [{} for _ in lp]
        for entry, name, logprob in zip(expected, lists["tokens"][1:], lp):
            entry.setdefault(name, logprob)
        assert lists["top_logprobs"] == [None, *expected]


def test_logprobs_are_the_raw_distribution_in_streams_and_whole_responses(server):
    url, _ = server
    body = complete(url, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3, seed=1).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 12
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and top[token] == logprob == max(top.values())  # greedy takes the most likely
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(12)]
    hot = complete(url, prompt="ROMEO:", max_tokens=12, temperature=5.0, logprobs=0, seed=1).json()["choices"][0]
    for logprob, top in zip(hot["logprobs"]["token_logprobs"], hot["logprobs"]["top_logprobs"]):
        assert list(top.values()) == [logprob]  # logprobs=0: the chosen token alone
    # the reported logprob ignores temperature: the same tokens score the same, whatever was sampled
    rescored = complete(url, prompt="ROMEO:" + hot["text"], max_tokens=0, echo=True, logprobs=0).json()
    echoed = rescored["choices"][0]["logprobs"]["token_logprobs"][len("ROMEO:"):]
    np.testing.assert_allclose(echoed, hot["logprobs"]["token_logprobs"], atol=1e-5)
    streamed = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0,
                                                            "logprobs": 3, "seed": 1, "stream": True,
                                                            "stream_options": {"include_usage": True}}, stream=True)
    chunks = [json.loads(line[6:]) for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]


def penalized_greedy(run_dir, prompt: str, tokens: int, frequency: float, presence: float) -> str:
    """The reference, written here: PyTorch's logits of the checkpoint the export came from, minus
    count * frequency + (count > 0) * presence over the tokens generated so far (OpenAI's formula; the
    prompt does not count), then the most likely token."""
    model, tokenizer, _ = load_checkpoint(run_dir)
    ids, out = tokenizer.encode(prompt), []
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(tokens):
            logits = model.eval()(torch.tensor([ids + out])).logits[0, -1].double()
            token = int((logits - counts * frequency - (counts > 0) * presence).argmax())
            out.append(token)
            counts[token] += 1
    return tokenizer.decode(out)


def test_penalties_give_the_text_of_openais_formula_on_pytorchs_logits(server, run_dir):
    url, _ = server
    expected = penalized_greedy(run_dir, "ROMEO:", 24, 1.5, 0.5)  # 6 + 24 tokens: within the 32 of the window
    assert penalized_greedy(run_dir, "ROMEO:", 24, 0.0, 0.0) != expected  # the penalties change this text
    penalized = complete(url, prompt="ROMEO:", max_tokens=24, temperature=0, frequency_penalty=1.5,
                         presence_penalty=0.5).json()["choices"][0]["text"]
    assert penalized == expected
    # the logprobs are the model's, before the penalties
    scored = complete(url, prompt="ROMEO:", max_tokens=20, temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
                      logprobs=0).json()["choices"][0]["logprobs"]["token_logprobs"]
    rescored = complete(url, prompt="ROMEO:" + penalized[:20], max_tokens=0, echo=True, logprobs=0).json()
    np.testing.assert_allclose(scored, rescored["choices"][0]["logprobs"]["token_logprobs"][6:], atol=1e-5)


def test_one_token_after_a_scored_prompt_is_the_token_the_batch_would_choose(server, bpe_server):
    """An evaluation client's request (echo, logprobs, max_tokens 1) takes its one token from the logits
    the scoring read, not through the batch: it must be the same token, prompts longer than the window too."""
    for url, prompt in ((server[0], TEXT[:20]), (server[0], TEXT[:100]), (bpe_server[0], TEXT[:400])):
        plain = complete(url, prompt=prompt, max_tokens=1, temperature=0, logprobs=2).json()["choices"][0]
        echoed = complete(url, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True).json()["choices"][0]
        assert echoed["text"] == prompt + plain["text"]
        assert echoed["logprobs"]["tokens"][-1] == plain["logprobs"]["tokens"][0]
        assert abs(echoed["logprobs"]["token_logprobs"][-1] - plain["logprobs"]["token_logprobs"][0]) < 1e-5


def test_token_id_prompts_tokenizer_endpoints_and_bad_input(server, export_dir):
    url, _ = server
    tokenizer = OnnxModel(export_dir).tokenizer
    ids = tokenizer.encode("ROMEO:")
    tokenized = requests.post(f"{url}/tokenize", json={"prompt": "ROMEO:"}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids) and tokenized["max_model_len"] == 32
    assert requests.post(f"{url}/tokenize", json={"content": "ROMEO:"}).json()["tokens"] == ids  # llama.cpp's
    assert requests.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "ROMEO:"
    assert requests.get(f"{url}/tokenizer_info").json()["eos_token"] is None  # a char model has none
    as_ids = complete(url, prompt=ids, max_tokens=10, seed=3).json()["choices"][0]["text"]
    assert as_ids == complete(url, prompt="ROMEO:", max_tokens=10, seed=3).json()["choices"][0]["text"]
    assert len(complete(url, prompt=[ids, ids], max_tokens=2).json()["choices"]) == 2
    for body, message in (({"prompt": "a", "max_tokens": 0}, "echo=true"),
                          ({"prompt": "a", "logprobs": 6}, "logprobs"),
                          ({"prompt": [9999], "max_tokens": 1}, "from 0 to 64"),
                          ({"prompt": "a", "stream_options": {"include": 1}}, "stream_options.include"),
                          ({"prompt": "a", "presence_penalty": 3}, "presence_penalty")):
        r = complete(url, **body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    assert requests.post(f"{url}/detokenize", json={"tokens": [70]}).status_code == 400
    assert complete(url, prompt="ROMEO:", max_tokens=3).status_code == 200  # and it keeps serving


def test_metrics_parse_and_move_with_the_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server

    def samples():
        text = requests.get(f"{url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    complete(url, prompt="ROMEO:", max_tokens=5)
    complete(url, prompt="ROMEO:", max_tokens=-1)
    stream = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 200, "stream": True},
                           stream=True)
    next(stream.iter_lines())
    stream.close()  # the client goes away mid-stream
    after = samples()
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    assert moved[("gpt_requests_total", (("status", "200"),))] >= 2
    assert moved[("gpt_requests_total", (("status", "400"),))] == 1
    assert moved[("gpt_generation_tokens_total", ())] >= 5 and moved[("gpt_prompt_tokens_total", ())] >= 6
    assert moved[("gpt_time_to_first_token_seconds_count", ())] >= 2
    assert moved[("gpt_inter_token_latency_seconds_count", ())] >= 4
    assert ("gpt_cache_slots", (("state", "free"),)) in after and ("gpt_kv_cache_bytes", ()) in after
    deadline = time.time() + 10
    while samples()[("gpt_requests_cancelled_total", ())] - before.get(("gpt_requests_cancelled_total", ()), 0) < 1:
        assert time.time() < deadline, "the abandoned stream was not counted as cancelled"
        time.sleep(0.1)


def test_metrics_need_no_key_unless_asked_to_be_private(export_dir):
    proc, url = start_server(export_dir, "--api-key", "secret")
    try:
        assert requests.get(f"{url}/metrics").status_code == 200 and requests.get(f"{url}/health").ok
        assert requests.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 401
        # the playground's page and files load without the key (the page asks for it); what it calls needs it
        assert requests.get(f"{url}/").ok and requests.get(f"{url}/static/app.js").ok
        assert requests.get(f"{url}/props").status_code == 401 and requests.post(f"{url}/").status_code == 401
        assert requests.get(f"{url}/staticx").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, url = start_server(export_dir, "--api-key", "secret", "--private-metrics")
    try:
        assert requests.get(f"{url}/metrics").status_code == 401
        assert requests.get(f"{url}/metrics", headers={"Authorization": "Bearer secret"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_openai_sdk_reads_logprobs_and_usage(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    result = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=2,
                                       echo=True)
    lp = result.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len("ROMEO:") + 8
    assert result.usage.prompt_tokens == 6 and result.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert [t for c in chunks if c.choices for t in c.choices[0].logprobs.tokens] == lp.tokens[6:]
    assert chunks[-1].usage.total_tokens == 14


# --- lm-evaluation-harness, through the API --------------------------------------------------------

TASK = """task: gpt_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.mark.slow
def test_lm_evaluation_harness_measures_what_serve_evaluate_measures(bpe_export_dir, tmp_path):
    """lm-eval's local-completions model (echo, logprobs, the remote tokenizer) runs a loglikelihood_rolling
    task defined here on local text; its bits per byte equal serve.evaluate's. lm-eval keeps one token of
    max_length for generation and one for context, so max_length = block_size + 2 gives its windows
    block_size tokens to predict, as serve.evaluate's default stride does. (The quantized graphs score
    over the API as serve.evaluate scores them: test_echo_with_logprobs_gives_what_serve_evaluate_gives.)"""
    variant = "fp32"
    require("lm_eval", "pip install -e '.[eval]'")
    paragraphs = [p for p in TEXT.split("\n\n") if len(p) > 80][:6]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gpt_local_text.yaml").write_text(TASK.format(data=data))
    ours = evaluate(bpe_export_dir, str(data), variant, log=lambda s: None)["variants"][variant]
    proc, url = start_server(bpe_export_dir, "--model", variant)
    try:
        args = (f"base_url={url}/v1/completions,model=tiny-bpe,tokenizer_backend=remote,max_length=34,"
                "num_concurrent=1,max_retries=1,tokenized_requests=True")
        run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                              "--tasks", "gpt_local_text", "--include_path", str(tmp_path / "tasks"),
                              "--output_path", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                                                             HF_HOME=str(tmp_path / "hf"), OPENAI_API_KEY="unused"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["gpt_local_text"]
    theirs = results["bits_per_byte,none"]
    print(f"{variant}: lm-eval {theirs:.6f} bits/byte, serve.evaluate {ours['bits_per_byte']:.6f}")
    assert math.isclose(theirs, ours["bits_per_byte"], rel_tol=1e-6), (theirs, ours["bits_per_byte"])
