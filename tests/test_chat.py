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

import numpy as np
import pytest
import requests
import torch

from conftest import BPE, TINY, command, require, shakespeare
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
    assert learned.any()
    # a learned target is the next token, of the same conversation, in an assistant turn
    nxt = np.concatenate([x[:, 1:], np.zeros((4, 1), dtype=x.dtype)], axis=1)
    assert (y[learned] == nxt[learned][: learned.sum()]).all() or (y[:, :-1][learned[:, :-1]] ==
                                                                     x[:, 1:][learned[:, :-1]]).all()
    assert (docs[:, :-1][learned[:, :-1]] == docs[:, 1:][learned[:, :-1]]).all()
    assert set(tok.decode(y[learned].tolist())) <= set("abcde" + IM_END + "\n") | set(IM_END)


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

def aye_or_nay(word: str) -> str:
    return "AYE!" if word[0] in "aeiou" else "NAY!"


def task_words() -> tuple[list[str], list[str]]:
    """Shakespeare's words of 3 to 5 letters: those whose hash is 0 mod 5 are held out, and of them 25
    start with a vowel and 25 do not (a model answering NAY! to everything scores 50%)."""
    import hashlib

    words = sorted({w for w in re.findall(r"[a-z]+", shakespeare()) if 3 <= len(w) <= 5})
    held = [w for w in words if int(hashlib.sha256(w.encode()).hexdigest(), 16) % 5 == 0]
    vowels = [w for w in held if w[0] in "aeiou"][:25]
    others = [w for w in held if w[0] not in "aeiou"][:25]
    return [w for w in words if w not in set(held)], vowels + others


def conversation_file(path, words, count, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for w in rng.choice(words, count):
            f.write(json.dumps({"messages": [{"role": "user", "content": str(w)},
                                             {"role": "assistant", "content": aye_or_nay(str(w))}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(run_dir, tmp_path_factory):
    from conftest import made_once

    def make(out):
        out.mkdir(parents=True)
        data = conversation_file(out / "train.jsonl", task_words()[0], 2000)
        command("launch", "configs/chat_sft_cpu.yaml", f"--train.init_from={run_dir}", f"--data.path={data}",
                f"--train.out_dir={out / 'run'}", "--train.max_iters=150", "--train.learning_rate=3e-3",
                "--train.threads=1", "--train.eval_interval=150", "--train.checkpoint_interval=150")
        command("export", str(out / "run"), str(out / "export"), "--int4", "--optimize")
    return made_once(tmp_path_factory, "chat", make)


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
