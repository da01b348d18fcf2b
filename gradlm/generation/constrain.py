"""Constrained decoding: output that always fits a choice list, a regular expression, a JSON schema or a grammar.

A Constraint says what a row's output must be. The engine (gradlm/generation/engine.py) compiles it against the
tokenizer with llguidance into one Matcher per row; before each sampling step the matcher says which
tokens may come next (a bitmask over the vocabulary), the other tokens' logits become -inf, and the
token picked is fed back to the matcher. So every sampling control (greedy, temperature, top-k/p, min-p,
penalties) chooses among allowed tokens only, an end token is allowed only where the output is complete,
and the row ends as soon as nothing more can follow.

    >>> c = make_constraint(regex=r"[0-9]+ mg")
    >>> guide = Guide(tok, model.cfg.vocab_size)
    >>> [m] = guide.matchers(c, 1, end_ids=[tok.eot_id])

Why llguidance: it reads gradlm's byte-level tokenizer.json as it is, computes one row's mask in 12-25
microseconds on the CPU for a 4k vocabulary (xgrammar is faster, 1-2 µs, but needs the vocabulary rebuilt by
hand and pulls in transformers; docs/benchmarks.md, "Constrained decoding"), and covers all the kinds below,
a Lark grammar included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from llguidance import LLMatcher, LLTokenizer

# (its numpy helpers: llguidance.torch compiles a function with torch.compile as it is imported, ~2 s of every command)
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from gradlm.errors import ConfigError
from gradlm.text.tokenizer import Tokenizer

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("choices", "regex", "json_schema", "json_object", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What a row's output must be. kind is one of KINDS; value is the list of choices (a tuple of
    strings), the regular expression, the JSON schema (a dict, or its JSON text), True for any JSON
    object, or a Lark grammar."""

    kind: str
    value: object

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (not yet checked: Guide.matchers reports problems)."""
        if self.kind == "choices":
            return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.value)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind in ("json_schema", "json_object"):
            # Compact JSON (", " and ": " between items, no other whitespace): a small model left free to
            # write whitespace can fill its budget with it; the schema's own "x-guidance" settings win.
            schema = self.value if self.kind == "json_schema" else {"type": "object"}
            return LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        return LLMatcher.grammar_from_lark(self.value)

    def describe(self) -> str:
        return {
            "choices": "the choice list",
            "regex": "the regular expression",
            "json_schema": "the JSON schema",
            "json_object": "the JSON object constraint",
            "grammar": "the grammar",
        }[self.kind]


def make_constraint(
    choices=None, regex=None, json_schema=None, json_object: bool = False, grammar=None
) -> Constraint | None:
    """The one Constraint given (None when none is): at most one of them, each of the right type."""
    given = {
        k: v
        for k, v in dict(choices=choices, regex=regex, json_schema=json_schema, grammar=grammar).items()
        if v is not None
    }
    if json_object:
        given["json_object"] = True
    if len(given) > 1:
        raise ConfigError(f"give at most one constraint, got {' and '.join(sorted(given))}")
    if not given:
        return None
    kind, value = given.popitem()
    if kind == "choices":
        if (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise ConfigError("choices must be a non-empty list of non-empty strings")
        value = tuple(dict.fromkeys(value))
    elif kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise ConfigError(f"the {kind} must be a non-empty string")
    elif kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise ConfigError(f"a JSON schema must be a JSON object, got {type(value).__name__}")
    return Constraint(kind, value)


def _one_line(error: str) -> str:
    """llguidance's message on one line: without the source excerpt and its ^ marker."""
    lines = [ln.strip() for ln in error.splitlines()]
    kept = [ln for ln in lines if ln and not set(ln) <= set("^ ") and not (ln[0].isdigit() and " | " in ln)]
    return " ".join(kept)[:400]


def constraint_failed(constraint: Constraint, error: str) -> str:
    """The message for a matcher that gave up while decoding (llguidance stops when a constraint grows past its
    limits, e.g. a regex like a{1000}{1000}): what was asked, why it stopped, and that the output is unfinished."""
    return (
        f"{constraint.describe()} could not be followed while decoding ({_one_line(error) or 'the matcher stopped'}): "
        "the output stopped before it fits; simplify the constraint"
    )


class Guide:
    """Compiles constraints against one tokenizer and vocabulary size (the model's, which may be larger)."""

    def __init__(self, tok: Tokenizer, vocab_size: int):
        self.json, self.vocab_size, self.eot_id = tok.to_json(), vocab_size, tok.eot_id
        self._lltoks: dict[frozenset[int], LLTokenizer] = {}

    def _lltok(self, end_ids: frozenset[int]) -> LLTokenizer:
        """The tokenizer as llguidance reads it, with these ids as the end of the output."""
        if end_ids not in self._lltoks:
            try:
                self._lltoks[end_ids] = LLTokenizer(self.json, n_vocab=self.vocab_size, eos_token=sorted(end_ids))
            except ValueError as e:
                raise ConfigError(f"constrained decoding cannot use this tokenizer: {e}") from None
        return self._lltoks[end_ids]

    def matchers(self, constraint: Constraint, n: int, end_ids) -> list[LLMatcher]:
        """n fresh matchers for constraint (one per row). end_ids end a row where the output is complete
        (its stop ids; <|endoftext|> when it has none). A constraint that cannot compile is a ConfigError."""
        ends = frozenset(end_ids) or frozenset([self.eot_id if self.eot_id >= 0 else 0])
        try:
            grammar = constraint.grammar()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{constraint.describe()} cannot be used: {_one_line(str(e))}") from None
        lltok = self._lltok(ends)
        out = []
        for _ in range(n):
            m = LLMatcher(lltok, grammar)
            if m.is_error():
                raise ConfigError(f"{constraint.describe()} cannot be used: {_one_line(m.get_error())}")
            out.append(m)
        return out


def mask_logits(logits: torch.Tensor, matchers: list[LLMatcher]) -> torch.Tensor:
    """logits (B, V) with every token that matchers[b] does not allow next set to -inf (a new tensor)."""
    B, V = logits.shape
    words = allocate_token_bitmask(B, V)
    for b, m in enumerate(matchers):
        fill_next_token_bitmask(m, words, b)
    bits = torch.from_numpy(words)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bits[:, :, None] >> shifts) & 1).reshape(B, -1)[:, :V].bool()  # bit j of word w is token 32 w + j
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
