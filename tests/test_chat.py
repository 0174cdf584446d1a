"""Chat: the template, supervised fine-tuning on conversations, and /v1/chat/completions.

The end-to-end test is the issue's goal at test size: a tiny model fine-tuned on a task it cannot do
before (answer AYE! when the user's word starts with a vowel, else NAY!) answers held-out words
through the official openai client against the exported int4 graph; a template that differed
between training and serving would show as lost accuracy. Another test holds the prompt token ids
of one conversation equal in our trainer, our server, transformers and llama.cpp.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import requests
import torch

from conftest import BPE, TINY, aye_or_nay, command, conversation_file, require, shakespeare, task_words
from gpt.chat import (
    CHATML,
    IM_END,
    IM_START,
    ChatTemplate,
    TemplateError,
    encode_conversation,
    prompt_ids,
    read_chat_template,
)
from gpt.checkpoint import resolve_checkpoint
from gpt.config import ModelConfig
from gpt.datasets import DataError
from gpt.model import GPT
from gpt.sft import IGNORE, PackedRows, get_rows, pack
from gpt.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, stop_ids

CHAT = ChatTemplate.chatml()
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "thou art"},
            {"role": "assistant", "content": "THOU ART!"}, {"role": "user", "content": "what?"},
            {"role": "assistant", "content": "WHAT!"}]


def char_tokenizer() -> CharTokenizer:
    tok = CharTokenizer(set(shakespeare())).with_special_tokens([IM_START, IM_END])
    tok.chat = CHAT
    return tok


def bpe_tokenizer() -> BPETokenizer:
    tok = BPETokenizer.train([shakespeare()[:200_000]], 400).with_special_tokens([IM_START, IM_END])
    tok.chat = CHAT
    return tok


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["char", "bpe"])
def test_the_loss_counts_the_assistant_turns_and_their_end_only(make):
    tok = make()
    assert tok.encode(f"{IM_START}user\n") [0] == tok.token_id(IM_START)  # one id, never split
    encoded = encode_conversation(tok, CHAT, MESSAGES)
    assert encoded.ids == tok.encode(CHAT.render(MESSAGES))
    learned = tok.decode([i for i, t in zip(encoded.ids, encoded.trained) if t])
    assert learned == f"THOU ART!{IM_END}\nWHAT!{IM_END}\n"
    # the prompt a server builds for the first answer is exactly the start of the training sequence
    prompt = prompt_ids(tok, CHAT, MESSAGES[:2])
    assert encoded.ids[:len(prompt)] == prompt and not any(encoded.trained[:len(prompt)])
    assert encoded.trained[len(prompt)]


def test_the_char_tokenizer_keeps_its_special_tokens_through_a_file(tmp_path):
    tok = char_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert back == tok and back.vocab_size == len(set(shakespeare())) + 2
    assert back.chat == CHAT and stop_ids(back) == {back.token_id(IM_END)}
    assert json.loads((tmp_path / "tokenizer.json").read_text())["version"] == 2  # older builds refuse it


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed"),  # reaching for Python's internals
    ("{{ cycler.__init__.__globals__.os.system('id') }}", "failed"),
    ("{{ raise_exception('only user turns') }}", "refused these messages: only user turns"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ messages.append(1) }}", "failed"),  # the sandbox is immutable
])
def test_a_template_that_fails_or_leaves_its_sandbox_is_a_template_error(template, message):
    with pytest.raises(TemplateError, match=re.escape(message)):
        ChatTemplate(template, IM_END).render(MESSAGES)


def test_a_folders_template_is_read_as_transformers_writes_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}],
        "eos_token": {"content": IM_END, "special": True}}))
    assert read_chat_template(tmp_path) == ChatTemplate(CHATML, IM_END)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": IM_END}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert read_chat_template(tmp_path).template == CHATML


def test_packing_keeps_conversations_whole_and_the_targets_inside_them():
    tok = char_tokenizer()
    convs = [encode_conversation(tok, CHAT, [{"role": "user", "content": w}, {"role": "assistant", "content": w}])
             for w in ("a", "bb", "ccc", "dddd", "eeeeeeeeeeeeeee")]
    rows = pack(convs, block_size=63)
    assert rows.conversations == 5 and sorted(len(c.ids) for c in convs) == sorted(
        int((rows.documents[r] == d).sum()) for r in range(len(rows)) for d in range(rows.documents[r].max() + 1))
    batch = get_rows(rows, 4, seed=1, split="train", step=0, shard=0)
    x, y, docs = batch["input_ids"].numpy(), batch["targets"].numpy(), batch["document_ids"].numpy()
    learned = y != IGNORE
    # a learned target is the next token, of the same conversation
    assert (y[:, :-1][learned[:, :-1]] == x[:, 1:][learned[:, :-1]]).all()
    assert (docs[:, :-1][learned[:, :-1]] == docs[:, 1:][learned[:, :-1]]).all()
    # and what each conversation learns is its answer and the end of the turn, nothing else
    for r in range(4):
        for d in range(docs[r].max() + 1):
            answer = tok.decode(y[r][learned[r] & (docs[r] == d)].tolist())
            assert re.fullmatch(rf"([a-e])\1*{re.escape(IM_END)}\n", answer), answer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_row_computes_each_conversation_as_if_it_were_alone(arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=50)
    model = GPT(config).eval()
    a, b = torch.randint(0, 50, (1, 11)), torch.randint(0, 50, (1, 7))
    row = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
    docs = torch.tensor([[0] * 11 + [1] * 7 + [-1] * 3])
    with torch.no_grad():
        packed = model(row, document_ids=docs).logits
        alone = torch.cat([model(a).logits, model(b).logits], 1)
    torch.testing.assert_close(packed[:, :18], alone, rtol=1e-5, atol=1e-5)


def test_new_tokens_leave_the_old_tokens_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=40)).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        model.grow_vocabulary(42)
        after = model(ids).logits
    assert after.shape[-1] == 42 and model.config.vocab_size == 42
    torch.testing.assert_close(after[..., :40], before)


# --- fine-tuning end to end ----------------------------------------------------------------------

@pytest.mark.slow
def test_fine_tuned_model_answers_held_out_prompts_through_the_openai_client(chat_run):
    openai = require("openai", 'pip install -e ".[test]"')
    from test_server import start_server

    checkpoint = load_tokenizer(chat_run / "run" / "checkpoints" / "step-000150" / "tokenizer.json")
    assert checkpoint.chat is not None and checkpoint.token_id(IM_END) is not None
    proc, url = start_server(chat_run / "export", "--model", "fused-int4")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        right = {"AYE!": 0, "NAY!": 0}
        for word in task_words()[1]:
            answer = client.chat.completions.create(model="export", messages=[{"role": "user", "content": word}],
                                                    temperature=0, max_tokens=10)
            choice = answer.choices[0]
            assert choice.finish_reason == "stop"  # ended at <|im_end|>, which is not in the content
            right[aye_or_nay(word)] += choice.message.content == aye_or_nay(word)
        assert right["AYE!"] >= 23 and right["NAY!"] >= 23, right  # >= 90% of each kind

        stream = client.chat.completions.create(model="export", messages=[{"role": "user", "content": "apple"}],
                                                temperature=0, stream=True, logprobs=True, top_logprobs=2,
                                                stream_options={"include_usage": True}, n=2)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
            assert "".join(c.delta.content or "" for c in mine) == "AYE!" and mine[-1].finish_reason == "stop"
            tokens = [lp.token for c in mine if c.logprobs for lp in c.logprobs.content]
            assert "".join(tokens) == "AYE!"  # one entry per content token, not the end of the turn
            assert all(len(lp.top_logprobs) >= 2 for c in mine if c.logprobs for lp in c.logprobs.content)
        prompt = len(prompt_ids(checkpoint, checkpoint.chat, [{"role": "user", "content": "apple"}]))
        assert chunks[-1].usage.prompt_tokens == prompt and chunks[-1].usage.completion_tokens == 2 * 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_conversations_are_named_or_counted(tmp_path, run_dir):
    from launch.train import load_corpus, setup

    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI!"}]}] * 30 + [
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "hi " * 40}, {"role": "assistant", "content": "HI"}]},
        {"prompt": "hi", "completion": "HI!"}, "not an object"]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = [f"--train.init_from={run_dir}", f"--data.path={data}", f"--train.out_dir={tmp_path / 'run'}"]
    config, _ = setup("configs/chat_sft_cpu.yaml", args, resume=False)
    with pytest.raises(DataError, match=r"chat.jsonl:31 message 0 has role 'wizard'.*data.skip_bad_files"):
        load_corpus(config, None)
    config, _ = setup("configs/chat_sft_cpu.yaml", [*args, "--data.skip_bad_files=true"], resume=False)
    corpus = load_corpus(config, None)
    assert corpus.stats["skipped"] == {"unknown role": 1, "empty assistant turn": 1, "longer than block_size": 1,
                                       "malformed": 1}
    splits = corpus.stats["splits"]
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == 31  # the pair is one too
    assert isinstance(corpus.train, PackedRows)


def test_a_config_that_cannot_fine_tune_fails_before_training(tmp_path, run_dir):
    from gpt.config import ConfigError
    from launch.train import setup

    with pytest.raises(ConfigError, match="data.path is required for data.format=chat"):
        setup("configs/chat_sft_cpu.yaml", [], resume=False)
    with pytest.raises(ConfigError, match=r"train.init_from=.*nowhere"):
        setup(str(TINY), ["--train.init_from=nowhere", f"--train.out_dir={tmp_path}"], resume=False)
    with pytest.raises(ConfigError, match="keep one"):
        setup(str(TINY), [f"--train.init_from={run_dir}", "--model.init_from=hf:gpt2"], resume=False)


# --- one conversation, the same prompt ids in every engine ---------------------------------------

@pytest.fixture(scope="module")
def bpe_chat_run(bpe_run_dir, tmp_path_factory):
    from conftest import made_once

    def make(out):
        out.mkdir(parents=True)
        data = conversation_file(out / "train.jsonl", task_words()[0], 200)
        command("launch", "configs/chat_sft_cpu.yaml", f"--train.init_from={bpe_run_dir}", f"--data.path={data}",
                f"--train.out_dir={out / 'run'}", "--train.max_iters=4", "--train.threads=1",
                "--train.eval_interval=4", "--train.eval_iters=1", "--train.checkpoint_interval=4", *BPE[:1])
        command("export", str(out / "run"), str(out / "onnx"))
        command("export", str(out / "run"), str(out / "hf"), "--format", "hf")
        command("export", str(out / "run"), str(out / "gguf"), "--format", "gguf", "--gguf-type", "f32")
    return made_once(tmp_path_factory, "bpe-chat", make)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["char", "bpe"])
def test_one_conversation_gives_the_same_prompt_ids_in_trainer_server_transformers_and_llama_cpp(
        which, chat_run, bpe_chat_run, tmp_path):
    transformers = require("transformers", 'pip install -e ".[test]"')
    llama_cpp = require("llama_cpp", 'pip install -e ".[test]" (llama-cpp-python)')
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from test_server import start_server

    if which == "char":
        run, onnx = chat_run / "run", chat_run / "export"
        command("export", str(run), str(tmp_path / "hf"), "--format", "hf")
        command("export", str(run), str(tmp_path / "gguf"), "--format", "gguf", "--gguf-type", "f32")
        hf, gguf = tmp_path / "hf", tmp_path / "gguf"
    else:
        run, onnx, hf, gguf = (bpe_chat_run / name for name in ("run", "onnx", "hf", "gguf"))
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "thou art"},
                {"role": "assistant", "content": "THOU ART!"}, {"role": "user", "content": "where?"}]
    tok = load_tokenizer(resolve_checkpoint(run) / "tokenizer.json")
    trainer = prompt_ids(tok, tok.chat, messages)
    assert trainer[0] == tok.token_id(IM_START) and tok.decode(trainer).endswith(f"{IM_START}assistant\n")

    proc, url = start_server(onnx)
    try:
        server = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    theirs = transformers.AutoTokenizer.from_pretrained(str(hf))
    hf_ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids

    llm = llama_cpp.Llama(model_path=str(next(gguf.glob("*.gguf"))), n_ctx=256, verbose=False, n_threads=1)
    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token="")(messages=messages).prompt
    llama_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
    short = [{"role": "user", "content": "hi"}]  # llama.cpp's own chat path, within the tiny model's 32 positions
    answer = llm.create_chat_completion(messages=short, max_tokens=2, temperature=0)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids(tok, tok.chat, short))

    assert trainer == server == list(hf_ids) == llama_ids
    if which == "bpe":  # onnxruntime-genai reads the ONNX folder's template, and stops at the end of the turn
        og = require("onnxruntime_genai", 'pip install -e ".[test]"')
        model = og.Model(str(onnx))
        genai = og.Tokenizer(model)
        rendered = genai.apply_chat_template(json.dumps(short), add_generation_prompt=True)
        ids = [int(i) for i in genai.encode(rendered)]
        assert ids == prompt_ids(tok, tok.chat, short)
        assert tok.token_id(IM_END) in json.loads((onnx / "genai_config.json").read_text())["model"]["eos_token_id"]


@pytest.mark.slow
def test_a_bad_chat_request_is_a_400_and_the_server_keeps_serving(chat_run, export_dir, tmp_path):
    from test_server import start_server

    picky = tmp_path / "picky"
    shutil.copytree(chat_run / "export", picky)
    config = json.loads((picky / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                               "{% endif %}{% if messages[0]['content'] == 'escape' %}"
                               "{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}"
                               "{% endif %}" + CHATML)
    (picky / "tokenizer_config.json").write_text(json.dumps(config))
    proc, url = start_server(picky)
    try:
        def chat(**body):
            return requests.post(f"{url}/v1/chat/completions", json={"max_tokens": 4, **body}, timeout=30)
        user = [{"role": "user", "content": "apple"}]
        for body, message in [
            ({"messages": [{"role": "system", "content": "x"}, *user]}, "refused these messages: no system turns"),
            ({"messages": [{"role": "user", "content": "escape"}]}, "chat template failed"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
            ({"messages": []}, "messages"),
            ({"messages": user, "top_logprobs": 3}, "top_logprobs needs logprobs: true"),
            ({"messages": user, "logprobs": True, "top_logprobs": 9}, "at most 5"),
            ({"messages": user, "max_tokens": 2, "max_completion_tokens": 3}, "differ"),
            ({"messages": [{"role": "user", "content": "ünïcode"}]}, "outside the vocabulary"),
        ]:
            r = chat(**body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
        assert not (tmp_path / "pwned").exists()
        assert chat(messages=user, temperature=0).json()["choices"][0]["message"]["content"] == "AYE!"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, url = start_server(export_dir)  # a model with no template: the answer says how to add one
    try:
        r = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat_template" in r.json()["error"]["message"]
        assert "data.format=chat" in r.json()["error"]["message"]
        assert requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3}).ok
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_the_terminal_chat_keeps_the_conversation(chat_run):
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    done = subprocess.run([sys.executable, "-m", "serve", str(chat_run / "export"), "--chat", "--greedy",
                           "--threads", "1"], input="apple\nthee\n", capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["AYE!", "NAY!"]
    done = subprocess.run([sys.executable, "-m", "serve", str(chat_run / "export")], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=120)
    assert done.returncode == 2 and "--prompt TEXT" in done.stderr


def test_fine_tuning_resumes_exactly_even_when_its_source_is_gone(run_dir, tmp_path):
    from launch.train import main, setup

    data = conversation_file(tmp_path / "chat.jsonl", task_words()[0], 300)
    source = tmp_path / "source"
    shutil.copytree(run_dir, source)
    args = [f"--train.init_from={source}", f"--data.path={data}", "--train.max_iters=6", "--train.threads=1",
            "--train.eval_interval=6", "--train.eval_iters=1", "--train.checkpoint_interval=3", "--train.batch_size=4",
            "--train.warmup_iters=2", "--train.lr_decay_iters=6"]  # the schedule of 6 steps, also when stopped at 3
    whole = main(*setup("configs/chat_sft_cpu.yaml", [*args, f"--train.out_dir={tmp_path / 'whole'}"], False))
    part = [*args, f"--train.out_dir={tmp_path / 'part'}"]
    main(*setup("configs/chat_sft_cpu.yaml", [*part, "--train.max_iters=3"], False))
    shutil.rmtree(source)  # the run resumes from its own checkpoint: its tokenizer, its shape
    resumed = main(*setup("configs/chat_sft_cpu.yaml", part, True))
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert whole.metrics["val_loss"] == resumed.metrics["val_loss"]


def test_a_hugging_face_chat_table_is_read_as_jsonl_is(tmp_path, run_dir):
    pq = require("pyarrow.parquet", 'pip install -e ".[corpora]"')
    import pyarrow as pa

    from launch.train import load_corpus, setup

    convs = [[{"role": "user", "content": w}, {"role": "assistant", "content": aye_or_nay(w)}]
             for w in task_words()[0][:60]]
    pq.write_table(pa.table({"messages": convs}), tmp_path / "train-00000.parquet")
    with open(tmp_path / "same.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in convs)
    seen = {}
    for name in ("train-00000.parquet", "same.jsonl"):
        data, out = tmp_path / name, tmp_path / "runs" / name
        args = [f"--train.init_from={run_dir}", f"--data.path={data}", f"--train.out_dir={out}"]
        config, _ = setup("configs/chat_sft_cpu.yaml", args, resume=False)
        corpus = load_corpus(config, None)
        seen[name] = sorted(map(tuple, np.concatenate([corpus.train.tokens, corpus.val.tokens]).tolist()))
    assert seen["train-00000.parquet"] == seen["same.jsonl"] and len(seen["same.jsonl"]) >= 30


def test_a_model_trained_on_conversations_from_scratch_gets_its_vocabulary_from_them(tmp_path):
    from launch.train import load_corpus, setup

    data = conversation_file(tmp_path / "chat.jsonl", task_words()[0], 200)
    config, _ = setup("configs/chat_sft_cpu.yaml", [f"--data.path={data}", f"--train.out_dir={tmp_path / 'run'}"],
                      resume=False)
    corpus = load_corpus(config, None)
    tok = corpus.tokenizer
    rendered = "".join(CHAT.render(json.loads(line)["messages"]) for line in data.read_text().splitlines())
    assert set(tok.chars) == set(rendered.replace(IM_START, "").replace(IM_END, ""))
    assert tok.special_tokens == [IM_START, IM_END] and tok.chat == CHAT
