"""Supervised fine-tuning data: conversations from .jsonl -> (ids, loss mask) examples -> padded batches.

A line of a .jsonl file is one conversation, in either form (other fields, e.g. "split", are ignored):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "What is ...?", "completion": "40 mg"}        # = one user turn + one assistant turn

Each conversation is laid out by the chat template (gradlm/text/chat.py); the loss covers only what the
assistant writes and its <|end|> tokens. A batch is (x, y) like the pretraining samplers give:
x (B, T) inputs padded with <|pad|>, y (B, T) next-token targets with -1 wherever the loss must not
look (user and system text, role tokens, padding); Transformer.forward(x, y) ignores targets of -1.

Why conversations are padded, not packed: packing several conversations into one window saves the
padding, but then attention must not cross from one conversation into another (and positions should
restart), which needs a block-diagonal attention mask that the model's training forward does not have.
Packing without it would let a reply attend to an unrelated conversation. Fine-tuning conversations
(e.g. the QA data: 20-40 tokens) are short and similar in length, and a batch is padded only to its
longest conversation, so padding costs little here.

Conversations longer than the context window: an example keeps its first block_size + 1 tokens (the
window's inputs plus the last target); what is cut is counted and reported once, and a conversation
left with no assistant token to learn is dropped (also counted). Nothing is cut silently.

    >>> data = load_sft(["qa.jsonl"], tok, block_size=128)
    >>> sampler = SFTSampler(data.examples, pad_id=tok.specials["<|pad|>"], seed=0)
    >>> x, y = sampler.next(16)                       # (16, T), T <= 128
    >>> loss = model(x, y)
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradlm.text.chat import Message, encode_for_training, validate_messages
from gradlm.text.corpus import JSONL_SUFFIXES, jsonl_objects
from gradlm.errors import DataError, TokenizerError
from gradlm.text.tokenizer import Tokenizer

PAD = "<|pad|>"


@dataclass
class Conversation:
    where: str  # "file line N", for messages
    messages: list[Message]
    extra: dict = field(default_factory=dict)  # the line's other fields (e.g. "split")


@dataclass
class Example:
    ids: list[int]  # the conversation's token ids (at most block_size + 1)
    mask: list[bool]  # mask[i]: the loss covers ids[i] (predicted from ids[:i])
    where: str


@dataclass
class SFTData:
    examples: list[Example]
    truncated: int = 0  # conversations cut to the context window
    dropped: int = 0  # conversations with nothing left to learn after the cut
    block_size: int = 0

    def warning(self) -> str | None:
        """One line about what the context window cut, or None when nothing was cut."""
        if not self.truncated:
            return None
        dropped = f", and {self.dropped} of them kept no assistant token and were left out" if self.dropped else ""
        return (
            f"warning: {self.truncated} of {len(self.examples) + self.dropped} conversations are longer than the "
            "context "
            f"window ({self.block_size + 1} tokens) and were cut to it{dropped}; use a larger --block-size or shorter "
            "conversations"
        )


# ---- reading -------------------------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(JSONL_SUFFIXES)


def conversation_from(obj: object, where: str) -> Conversation:
    """One .jsonl value as a Conversation ("messages", or "prompt" + "completion"); DataError otherwise."""
    if not isinstance(obj, dict):
        raise DataError(
            f'{where}: expected an object with "messages" or "prompt" and "completion", got {type(obj).__name__}'
        )
    has_messages, has_prompt = "messages" in obj, "prompt" in obj or "completion" in obj
    if has_messages and has_prompt:
        raise DataError(f'{where} has both "messages" and "prompt"/"completion"; give one form per line')
    if has_messages:
        messages = validate_messages(obj["messages"], where)
        rest = {k: v for k, v in obj.items() if k != "messages"}
    elif has_prompt:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f'{where}: "prompt" and "completion" must both be strings')
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    else:
        raise DataError(
            f'{where} has neither "messages" nor "prompt" and "completion"; see `gradlm finetune --help` for the '
            "formats"
        )
    return Conversation(where, messages, rest)


def read_conversations(paths: str | os.PathLike | list) -> list[Conversation]:
    """Every conversation of one or more .jsonl (or .jsonl.gz) files, in order."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Conversation] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f'no such file: {p}; chat data is .jsonl with "messages" or "prompt"/"completion" per line')
        if not _is_jsonl(p):
            raise DataError(
                f"{p} is not .jsonl: chat data is one JSON conversation per line (raw text is for continued "
                "pretraining)"
            )
        found = [conversation_from(obj, f"{p} line {n}") for n, obj in jsonl_objects(p)]
        if not found:
            raise DataError(f"{p} holds no conversations")
        out += found
    return out


def is_chat_file(path: str | os.PathLike) -> bool:
    """Whether a file is chat data: .jsonl whose first line has "messages" or "prompt" (else it is text
    for continued pretraining)."""
    p = Path(path)
    if not (p.is_file() and _is_jsonl(p)):
        return False
    for _, obj in jsonl_objects(p):
        return isinstance(obj, dict) and ("messages" in obj or "prompt" in obj)
    return False


# ---- examples ------------------------------------------------------------------------------------------


def make_examples(conversations: list[Conversation], tok: Tokenizer, block_size: int) -> SFTData:
    """(ids, mask) per conversation, each cut to block_size + 1 tokens (see the module docstring)."""
    if block_size < 1:
        raise DataError(f"the context window must be at least 1 token, got {block_size}")
    examples, truncated, dropped = [], 0, 0
    for c in conversations:
        ids, mask = encode_for_training(tok, c.messages, c.where)
        if len(ids) > block_size + 1:
            truncated += 1
            ids, mask = ids[: block_size + 1], mask[: block_size + 1]
            if not any(mask[1:]):
                dropped += 1
                continue
        examples.append(Example(ids, mask, c.where))
    if not examples:
        raise DataError(
            f"every conversation is longer than the context window ({block_size + 1} tokens) before its first reply; "
            "use a larger --block-size"
        )
    return SFTData(examples, truncated, dropped, block_size)


def load_sft(paths: str | os.PathLike | list, tok: Tokenizer, block_size: int) -> SFTData:
    """Read .jsonl chat data and turn it into training examples; report data.warning() to the user."""
    return make_examples(read_conversations(paths), tok, block_size)


def split_examples(examples: list[Example], val_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random val_fraction of the examples (at least one when val_fraction > 0)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(examples), []
    if len(examples) < 2:
        raise DataError(
            f"{len(examples)} conversation is too few to hold some out for validation; add data or set the validation "
            "fraction to 0"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pad_id(tok: Tokenizer) -> int:
    """The id batches are padded with: the dedicated <|pad|> (never <|end|>, which the model must learn)."""
    if PAD not in tok.specials:
        raise TokenizerError(
            f"this tokenizer has no {PAD} token to pad batches with; fine-tune from a run whose tokenizer gradlm "
            "trained"
        )
    return tok.specials[PAD]


def collate(examples: list[Example], pad: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) inputs and y (B, T) targets of some examples, right-padded to T = the longest input (or
    `length`, for fixed shapes). y is -1 where the loss does not look, so padding never counts; with
    right padding and causal attention no real token ever attends to a pad."""
    T = max(len(e.ids) - 1 for e in examples)
    T = max(T, length)
    x = torch.full((len(examples), T), pad, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        keep = torch.tensor(e.mask[1:], dtype=torch.bool)
        n = len(e.ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(keep, ids[1:], -1)
    return x, y


def batches(examples: list[Example], batch: int, pad: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All examples once, in order, batch at a time (for validation loss)."""
    for i in range(0, len(examples), batch):
        yield collate(examples[i : i + batch], pad)


# ---- sampling ------------------------------------------------------------------------------------------


def fingerprint(examples: list[Example]) -> str:
    """Identity of a list of examples (ids and masks), so resuming on different data is caught."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.ids, e.mask)).encode())
    return h.hexdigest()[:16]


class SFTSampler:
    """Every example once per epoch, in a seeded shuffled order; next(batch) -> (x, y) like the
    pretraining samplers (gradlm/text/data.py), so the trainer runs it the same way.

    Epoch e uses the permutation drawn from seed + e, so the position (epoch, pos) is the whole state
    and resume is exact. A batch never crosses an epoch: the last batch of an epoch may be smaller.
    length > 0 pads every batch to that length (fixed shapes, e.g. for torch.compile); 0 pads each
    batch to its longest example.
    """

    def __init__(self, examples: list[Example], pad_id: int, seed: int, length: int = 0):
        if not examples:
            raise DataError("no fine-tuning examples to sample from")
        self.examples, self.pad, self.seed, self.length = examples, pad_id, seed, length
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)
        self._fingerprint = fingerprint(examples)

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    n_windows = n_examples  # the name the trainer's full-batch mode reads (an example is one window)

    def _perm(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def order(self, epoch: int) -> list[int]:
        """Example indices in the order epoch `epoch` visits them."""
        return self._perm(epoch)

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch < 1:
            raise DataError(f"batch size must be at least 1, got {batch}")
        idx = self._order[self.pos : self.pos + batch]
        self.pos += len(idx)
        x, y = collate([self.examples[i] for i in idx], self.pad, self.length)
        if self.pos >= len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        return x, y

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / len(self.examples)

    def state_dict(self) -> dict:
        return {
            "kind": "sft",
            "epoch": self.epoch,
            "pos": self.pos,
            "examples": len(self.examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft" or state.get("fingerprint") != self._fingerprint:
            raise DataError(
                "the fine-tuning data differs from the data this run was saved with (different file, tokenizer or "
                "context window); resume with the same --data, or start a new run"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)
