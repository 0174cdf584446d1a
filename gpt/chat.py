"""Conversations: the chat template that turns messages into one prompt, and what a model learns from them.

A chat model reads a conversation as one text with markers between the turns. Which markers is the
model's *chat template*, a Jinja template in Hugging Face's convention (`chat_template` in
`tokenizer_config.json`, rendered with `messages` and `add_generation_prompt`), so that every engine
that reads the folder (transformers, onnxruntime-genai, llama.cpp, this server) builds the same prompt.
A model without one gets ChatML, the template of SmolLM2 and Qwen:

    <|im_start|>user
    What is 2+3?<|im_end|>
    <|im_start|>assistant
    5<|im_end|>

whose two markers become new special tokens (one id each, never split or produced by ordinary text).
`<|im_end|>` also ends the assistant's turn: generation stops there.

Training on a conversation (encode_conversation) counts the loss on the assistant's turns only, their
end-of-turn marker included, so the model learns to answer and to stop, not to write the user's part.
Where a turn starts and ends is found by rendering the conversation up to each assistant turn: the
template is a black box, so any template works, as long as a conversation's rendering begins with the
rendering of its first turns (every chat template does; one that does not is refused).

A template is code from a downloaded folder: it runs in Jinja's immutable sandbox, and one that fails
or tries to reach outside is a TemplateError, never a crash. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A template that does not render these messages (or tried to leave the sandbox)."""


class ConversationError(ValueError):
    """A conversation that cannot be trained on or answered: what is wrong, and the fix."""


@dataclass
class ChatTemplate:
    """A model's chat template and the tokens it needs.

    eos_token ends an assistant turn (generation stops there); special_tokens are the markers the
    template writes, each one token."""

    template: str
    eos_token: str
    bos_token: str | None = None
    special_tokens: list[str] = field(default_factory=list)

    @classmethod
    def chatml(cls) -> ChatTemplate:
        return cls(CHATML, IM_END, None, [IM_START, IM_END])

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model reads it; with add_generation_prompt, ending where the
        assistant's answer starts."""
        try:
            return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token or "", eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as e:  # jinja's SecurityError, UndefinedError, TypeError from the template's own code
            raise TemplateError(f"the chat template failed on these messages ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def config_fields(self) -> dict:
        """The fields of tokenizer_config.json (Hugging Face's convention) that carry this template."""
        out = {"chat_template": self.template, "eos_token": self.eos_token}
        if self.bos_token:
            out["bos_token"] = self.bos_token
        if self.special_tokens:
            out["additional_special_tokens"] = list(self.special_tokens)
        return out

    @classmethod
    def from_config(cls, config: dict) -> ChatTemplate | None:
        """From a tokenizer_config.json's fields; None when it has no template."""
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            return None
        eos, bos = _token_text(config.get("eos_token")), _token_text(config.get("bos_token"))
        if not eos:
            raise TemplateError("tokenizer_config.json has a chat_template but no eos_token: name the token that "
                                "ends an assistant turn (e.g. \"eos_token\": \"<|im_end|>\")")
        specials = [_token_text(t) for t in config.get("additional_special_tokens") or []]
        return cls(template, eos, bos, [t for t in specials if t])


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


_CACHE: dict[str, object] = {}


def _compiled(template: str):
    """The template compiled once, in an immutable sandbox with transformers' settings and helpers."""
    if template not in _CACHE:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"the chat template refused these messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            compiled = env.from_string(template)
        except TemplateSyntaxError as e:
            raise TemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[template] = compiled
    return _CACHE[template]


# --- tokenizer_config.json: where a folder keeps its template ---------------------------------------

CONFIG_FILE = "tokenizer_config.json"


def read_chat_template(folder: str | Path) -> ChatTemplate | None:
    """A folder's template: `chat_template.jinja` (transformers' newer layout) or `chat_template` in its
    tokenizer_config.json, with the eos_token from there; None when the folder has neither."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise TemplateError(f"{path} is not valid JSON ({e}): fix or delete it") from None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and not config.get("chat_template"):
        config = {**config, "chat_template": jinja.read_text(encoding="utf-8")}
    return ChatTemplate.from_config(config) if isinstance(config, dict) else None


def write_chat_fields(folder: str | Path, template: ChatTemplate | None, base: dict | None = None) -> None:
    """tokenizer_config.json in `folder`: `base` (the fields an engine needs) and the template's."""
    config = dict(base or {})
    if template is not None:
        config |= template.config_fields()
    if config:
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# --- conversations ---------------------------------------------------------------------------------

def conversation(record) -> list[dict]:
    """The messages of one record: {"messages": [{"role", "content"}, ...]}, or a {"prompt",
    "completion"} pair (a user turn and the assistant's answer). Raises ConversationError."""
    if not isinstance(record, dict):
        raise ConversationError(f"is a JSON {type(record).__name__}, not an object with \"messages\"")
    if "messages" not in record and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        record = {"messages": [{"role": "user", "content": record["prompt"]},
                               {"role": "assistant", "content": record["completion"]}]}
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise ConversationError(f"has no \"messages\" list (nor a \"prompt\" and a \"completion\"; its fields: "
                                f"{fields})")
    return check_messages(messages, training=True)


def check_messages(messages, training: bool = False) -> list[dict]:
    """Messages as the template expects them: each a {"role", "content"} with a known role and text
    content. Training also needs an assistant turn, and no empty one."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConversationError(f"message {i} needs a \"role\" and a text \"content\"")
        if m.get("role") not in ROLES:
            raise ConversationError(f"message {i} has role {m.get('role')!r}: use one of {', '.join(ROLES)}")
        if training and m["role"] == "assistant" and not m["content"].strip():
            raise ConversationError(f"message {i} is an empty assistant turn: give it content, or remove it")
        out.append({"role": m["role"], "content": m["content"]})
    if training and not any(m["role"] == "assistant" for m in out):
        raise ConversationError("has no assistant turn: there is nothing to learn from it")
    return out


@dataclass
class EncodedConversation:
    ids: list[int]
    trained: list[bool]  # per token: part of an assistant turn (the loss counts it)


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict]) -> EncodedConversation:
    """The conversation's token ids, and which of them the model learns (the assistant's turns).

    The text is encoded once, as the server encodes a prompt; each token belongs to an assistant turn
    when it starts inside one. The spans come from rendering the conversation up to each assistant
    turn: with the generation prompt (where the answer starts) and without (where it ends)."""
    text = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError("the chat template does not render a conversation as its first turns followed by "
                                "the next: the assistant's turns cannot be found to train on")
        spans.append((len(before), len(through)))
    ids, starts = tokenizer.encode_with_offsets(text)
    trained, s = [], 0
    for start in starts:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        trained.append(s < len(spans) and spans[s][0] <= start)
    return EncodedConversation(ids, trained)


def prompt_ids(tokenizer, template: ChatTemplate, messages: list[dict]) -> list[int]:
    """The token ids of a conversation, ending where the assistant's answer starts: what a chat request
    asks the model to continue."""
    return tokenizer.encode(template.render(messages, add_generation_prompt=True))
