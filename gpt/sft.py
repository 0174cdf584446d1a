"""Supervised fine-tuning data: conversations to packed rows of tokens, the loss on the assistant's turns.

1. Read the conversations (data.format=chat): JSON lines, plain or compressed, each
   {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}; or a parquet or Arrow table
   (a Hugging Face dataset) with a `messages` column. Held out by a hash of each one's name, as text is.
2. Render each with the chat template and encode it once (gpt.chat.encode_conversation): its tokens,
   and which of them the model learns from.
3. Pack whole conversations into rows of block_size + 1 tokens, first fit in order, never cutting
   one: each row holds several, each with its own document id. The model attends within a document
   only and counts positions from its start (GPT.forward's document_ids), so a packed row trains
   as its conversations would one at a time, without the padding.

A conversation that is malformed (unknown role, empty assistant turn, no assistant turn) or longer
than a row is counted and reported: left out with data.skip_bad_files, else an error naming the file
and line. Conversations are small next to pretraining text: they are prepared in memory at the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt.chat import ChatTemplate, ConversationError, TemplateError, conversation, encode_conversation
from gpt.corpus import in_val
from gpt.data import SPLIT_IDS, TokenizedCorpus, corpus_files, fingerprint
from gpt.datasets import DataError
from gpt.formats import FormatError, json_records, kind, table_values

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


@dataclass
class PackedRows:
    """One split's conversations packed into rows: tokens, what is learned, and which document."""

    tokens: np.ndarray  # (N, block_size + 1) int64
    trained: np.ndarray  # (N, block_size + 1) bool: an assistant token (padding never is)
    documents: np.ndarray  # (N, block_size + 1) int32: the conversation's number in its row; -1 is padding
    conversations: int = 0

    def __len__(self) -> int:  # rows
        return len(self.tokens)

    @property
    def trained_tokens(self) -> int:
        return int(self.trained.sum())


@dataclass
class Problems:
    """Conversations left out, by reason, with where (file:line) for the first few."""

    counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def records(path: Path, name: str):
    """(where, record) of every conversation of a file: a JSON-lines line or a table's row (a line that
    is not JSON comes as its ConversationError). A damaged file raises FormatError."""
    if kind(path) == "jsonl":
        for number, record, problem in json_records(path):
            yield f"{name}:{number}", ConversationError(problem) if problem else record
        return
    if kind(path) == "table":
        for row, messages in table_values(path, "messages"):
            yield f"{name}:{row}", {"messages": messages}
        return
    raise DataError(f"{path}: data.format=chat reads conversations from .jsonl(.gz/.zst), .parquet or .arrow files "
                    "(one {\"messages\": [...]} or {\"prompt\", \"completion\"} each), not plain text")


def read_conversations(files: list[Path], root: Path, tokenizer, template: ChatTemplate, block_size: int,
                       val_fraction: float, skip_bad: bool) -> tuple[dict, Problems]:
    """{split: [EncodedConversation, ...]} and what was left out (raises DataError without skip_bad)."""
    splits, problems = {"train": [], "val": []}, Problems()
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        try:
            for where, record in records(path, name):
                try:
                    if isinstance(record, Exception):
                        raise record
                    encoded = encode_conversation(tokenizer, template, conversation(record))
                    if len(encoded.ids) > block_size + 1:
                        raise ConversationError(f"is {len(encoded.ids)} tokens after templating, over block_size + 1 "
                                                f"= {block_size + 1}")
                except ValueError as e:  # ConversationError, TemplateError, a character out of vocabulary
                    reason = str(e)
                    if not skip_bad:
                        raise DataError(f"{where} {reason}; fix it, or set data.skip_bad_files=true to leave such "
                                        "conversations out (they are counted)") from None
                    problems.add(_reason(reason), where)
                    continue
                splits["val" if in_val(where, val_fraction) else "train"].append(encoded)
        except FormatError as e:
            raise DataError(str(e)) from None
    return splits, problems


REASONS = (("over block_size", "longer than block_size"), ("empty assistant turn", "empty assistant turn"),
           ("has role", "unknown role"), ("no assistant turn", "no assistant turn"), ("not a JSON", "not JSON"),
           ("outside the vocabulary", "outside the vocabulary"), ("chat template", "chat template"))


def _reason(message: str) -> str:
    """A problem's kind, for counting: the message without its particulars."""
    return next((label for key, label in REASONS if key in message), "malformed")


def pack(conversations: list, block_size: int) -> PackedRows:
    """First fit, in order: each conversation goes into the first row with room for it, whole."""
    L = block_size + 1
    rows: list[list] = []  # per row: its conversations
    room: list[int] = []
    for c in conversations:
        n = len(c.ids)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(c)
                room[r] -= n
                break
        else:
            rows.append([c])
            room.append(L - n)
    tokens = np.zeros((len(rows), L), dtype=np.int64)
    trained = np.zeros((len(rows), L), dtype=bool)
    documents = np.full((len(rows), L), -1, dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for d, c in enumerate(row):
            n = len(c.ids)
            tokens[r, at:at + n] = c.ids
            trained[r, at:at + n] = c.trained
            documents[r, at:at + n] = d
            at += n
    return PackedRows(tokens, trained, documents, len(conversations))


def get_rows(data: PackedRows, batch_size: int, seed: int, split: str, step: int, shard: int,
             evaluation: bool = False) -> dict[str, torch.Tensor]:
    """A batch of random rows as the model's keyword arguments: input_ids (B, T), targets (B, T) with
    IGNORE wherever the next token is not the assistant's or starts another document, document_ids (B, T).
    Which rows is a pure function of (seed, split, step, shard), as gpt.data.get_batch's windows."""
    if len(data) == 0:
        raise DataError(f"the {split} split holds no conversation: add more, or raise data.val_fraction")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], int(evaluation), step, shard])
    picked = rng.integers(0, len(data), size=batch_size)
    tokens, trained, docs = data.tokens[picked], data.trained[picked], data.documents[picked]
    targets = np.where(trained[:, 1:] & (docs[:, 1:] == docs[:, :-1]), tokens[:, 1:], IGNORE)
    return {"input_ids": torch.from_numpy(tokens[:, :-1]), "targets": torch.from_numpy(targets),
            "document_ids": torch.from_numpy(docs[:, :-1].astype(np.int64))}


# --- the corpus: tokenizer, template and packed splits ---------------------------------------------

def chat_tokenizer(tokenizer, template: ChatTemplate):
    """The tokenizer with the template's markers as tokens (new ids when it lacks them) and the template."""
    needed = [t for t in [*template.special_tokens, template.eos_token, template.bos_token] if t]
    out = tokenizer.with_special_tokens(needed)
    out.chat = template
    return out


def template_for(config, tokenizer) -> ChatTemplate:
    """data.chat_template (a Jinja file) if set, else the tokenizer's own (an imported model's), else ChatML."""
    if config.chat_template:
        path = Path(config.chat_template).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template={config.chat_template} does not exist: point it at a Jinja file, or "
                            "drop it for the model's own template (ChatML when it has none)")
        own = tokenizer.chat if tokenizer is not None else None
        return ChatTemplate(path.read_text(encoding="utf-8"), own.eos_token if own else "<|im_end|>",
                            own.bos_token if own else None, list(own.special_tokens) if own else
                            list(ChatTemplate.chatml().special_tokens))
    if tokenizer is not None and tokenizer.chat is not None:
        return tokenizer.chat
    return ChatTemplate.chatml()


def fresh_tokenizer(config, files: list[Path], root: Path, template: ChatTemplate):
    """A tokenizer for a model trained on conversations from scratch: the characters (char) or BPE
    merges (bpe) of the rendered conversations, the template's markers left out (they become tokens)."""
    import re

    from gpt.tokenizer import BPETokenizer, CharTokenizer

    markers = [t for t in [*template.special_tokens, template.eos_token, template.bos_token] if t]
    cut = re.compile("|".join(map(re.escape, markers))) if markers else None

    def texts():
        for path in files:
            name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            for _, record in records(path, name):
                try:
                    text = template.render(conversation(record))
                except (ConversationError, TemplateError, AttributeError):
                    continue
                yield cut.sub("\n", text) if cut else text

    if config.tokenizer == "char":
        chars = set()
        for text in texts():
            chars.update(text)
        if not chars:
            raise DataError("no conversation could be read to build a vocabulary from: check data.path")
        return CharTokenizer(chars)
    return BPETokenizer.train(texts(), config.vocab_size)


def prepare_chat(config, block_size: int, base_tokenizer=None):
    """The conversations of data.path as a gpt.data.TokenizedCorpus of PackedRows. base_tokenizer is
    the tokenizer of the model fine-tuned (None: a new one from the conversations)."""
    import hashlib

    from gpt.tokenizer import tokenizer_sha256

    files, root = corpus_files(config)
    template = template_for(config, base_tokenizer)
    tokenizer = chat_tokenizer(base_tokenizer or fresh_tokenizer(config, files, root, template), template)
    splits, problems = read_conversations(files, root, tokenizer, template, block_size, config.val_fraction,
                                          config.skip_bad_files)
    packed = {s: pack(c, block_size) for s, c in splits.items()}
    key = hashlib.sha256((fingerprint(files, root, config) + tokenizer_sha256(tokenizer) + template.template +
                          str(block_size)).encode()).hexdigest()
    splits_stats = {s: {"conversations": p.conversations, "rows": len(p), "trained_tokens": p.trained_tokens,
                        "packed_tokens": int((p.documents >= 0).sum())} for s, p in packed.items()}
    stats = {"format": "chat", "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "files": len(files),
             "root": str(root), "skipped": dict(problems.counts), "skipped_examples": problems.examples,
             "splits": splits_stats}
    return TokenizedCorpus(tokenizer, packed["train"], packed["val"], key, stats)
