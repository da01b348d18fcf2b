"""The chat template: the one definition of how a conversation becomes token ids.

Every user of conversations goes through this file: supervised fine-tuning (ids + loss mask),
`gradlm chat`, the HTTP server, QA evaluation and the Hugging Face export (as a Jinja template that
renders the same ids). A conversation is laid out with the reserved special tokens:

    <|endoftext|><|system|>You are terse.<|end|><|user|>Dose of zorvastatin?<|end|><|assistant|>40 mg<|end|>
    ^ start of a document, as in pretraining                             generation prompt ^^^^^^^^^^^^^

- Each turn is a role token, the content as plain text, and <|end|>. The model learns to end its reply
  with <|end|>, which is where generation stops.
- Content is always text: "<|user|>" typed by a user is encoded as the characters it spells, never as
  the special id. Only this template inserts special ids.
- Nothing but a special token sits between two contents, so byte-level BPE (which never merges across a
  special token) tokenizes every content exactly as `tok.encode(content)` does. That is what lets the
  string template below, rendered and tokenized by transformers, give the same ids as we build here.

Example:
    >>> ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])           # ends with <|assistant|>
    >>> ids, mask = encode_for_training(tok, [{"role": "user", "content": "Hi"},
    ...                                       {"role": "assistant", "content": "Hello"}])
    >>> tok.decode(i for i, m in zip(ids, mask) if m)                       # 'Hello<|end|>'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradlm.errors import DataError, TokenizerError
from gradlm.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
CHAT_TOKENS = (*ROLE_TOKENS.values(), END)
TEMPLATE_FILE = "chat_template.jinja"

# The same layout for transformers' apply_chat_template (tokenizer_config.json "chat_template").
# bos_token is <|endoftext|> in an exported gradlm tokenizer (hf_tokenizer_config sets it so).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

Message = dict[str, str]


def has_chat_tokens(tok: Tokenizer) -> bool:
    """Whether tok has every special token the chat template needs (gradlm tokenizers always do)."""
    return all(t in tok.specials for t in CHAT_TOKENS)


def chat_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the chat tokens by name: "system", "user", "assistant", "end" (TokenizerError if missing)."""
    missing = [t for t in CHAT_TOKENS if t not in tok.specials]
    if missing:
        raise TokenizerError(
            f"this tokenizer lacks the chat tokens {', '.join(missing)}, so the model cannot be used for chat; "
            "use a tokenizer trained by gradlm (it reserves them) or fine-tune from such a run"
        )
    ids = {role: tok.specials[t] for role, t in ROLE_TOKENS.items()}
    ids["end"] = tok.specials[END]
    return ids


def stop_ids(tok: Tokenizer) -> set[int]:
    """Ids that end an assistant reply: <|end|>, and <|endoftext|> for a model that never learned <|end|>."""
    out = {chat_ids(tok)["end"]}
    if tok.eot_id >= 0:
        out.add(tok.eot_id)
    return out


def validate_messages(messages: Any, where: str = "the conversation") -> list[Message]:
    """The messages as a list of {"role", "content"} dicts, or DataError naming the first problem.

    Roles are system, user and assistant; content is a string; a system message may only come first.
    `where` names the conversation in the message (e.g. "data.jsonl line 7").
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f'{where}: message {n} must be an object with "role" and "content", got {type(m).__name__}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {n} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f'{where}: message {n} ({role}) needs "content" as a string, got {type(content).__name__}')
        if role == "system" and n > 1:
            raise DataError(f"{where}: message {n} is a system message; a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def _segments(tok: Tokenizer, messages: list[Message]) -> list[tuple[list[int], bool]]:
    """The conversation as (ids, trained) pieces in order: the template's special ids and each content
    tokenized on its own. trained marks what an assistant writes: its content and its <|end|>."""
    ids = chat_ids(tok)
    pieces: list[tuple[list[int], bool]] = []
    if tok.eot_id >= 0:
        pieces.append(([tok.eot_id], False))
    for m in messages:
        reply = m["role"] == "assistant"
        pieces.append(([ids[m["role"]]], False))
        pieces.append((tok.encode(m["content"]), reply))
        pieces.append(([ids["end"]], reply))
    return pieces


def encode_chat(tok: Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with add_generation_prompt it ends with <|assistant|>, ready for the
    model to write the next reply (stop at stop_ids(tok))."""
    msgs = validate_messages(messages)
    out = [i for piece, _ in _segments(tok, msgs) for i in piece]
    if add_generation_prompt:
        out.append(chat_ids(tok)["assistant"])
    return out


def encode_for_training(
    tok: Tokenizer, messages: list[Message], where: str = "the conversation"
) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a conversation for supervised fine-tuning: mask[i] is True where ids[i] is a token
    the loss covers, i.e. every assistant content token and each assistant turn's <|end|>.

    The mask is built per segment (each content tokenized separately, then concatenated), never by
    searching the tokenized text for a template. To train, predict ids[i] from ids[:i] where mask[i].
    """
    msgs = validate_messages(messages, where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(
            f"{where} has no assistant message, so there is nothing to learn from it; add the reply to train on"
        )
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trained in _segments(tok, msgs):
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def write_chat_template(directory: str | os.PathLike) -> Path:
    """Save the template as chat_template.jinja in a run (or export) directory, atomically.

    The run keeps the template it was trained with beside tokenizer.json (transformers also reads a
    chat_template.jinja placed next to tokenizer.json); read it back with read_chat_template."""
    from gradlm.files import atomic_write_text

    path = Path(directory) / TEMPLATE_FILE
    atomic_write_text(path, CHAT_TEMPLATE)
    return path


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The template saved in a run directory, or None when the run has none (a base model)."""
    path = Path(directory) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
