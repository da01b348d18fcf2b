"""Text in, text out: the LM API and `gradlm generate`, a thin layer over the one engine.

An LM is a model and its tokenizer. Its calls turn prompts into token ids, admit them as rows of the
engine (gradlm/generation/engine.py: KV cache, batching, the sampler, stop strings, the text edge) and step it until
they are done; several prompts decode together and each row finishes on its own. When a row's context
fills the window it keeps its newest half and goes on (a sliding window), exactly as it would alone.
Sampling settings are a SamplingConfig (gradlm/model/sampling.py).

Example:
    >>> lm = load("runs/demo")
    >>> for piece in lm.stream("ROMEO:", max_new_tokens=50, stop=["\\n\\n"], seed=1):
    ...     print(piece, end="", flush=True)
    >>> lm.generate_batch(["To be", "KING"], temperature=0)      # greedy, one batch
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gradlm.generation.constrain import KINDS, Constraint, make_constraint
from gradlm.text.corpus import jsonl_objects, read_text
from gradlm.generation.engine import Engine, Request, Token
from gradlm.errors import ConfigError, ConstraintError, DataError
from gradlm.model.transformer import Transformer
from gradlm.runtime import Runtime
from gradlm.model.sampling import SamplingConfig
from gradlm.text.tokenizer import Tokenizer

__all__ = [
    "LM",
    "Completion",
    "Event",
    "SamplingConfig",
    "TokenLogprob",
    "generate_text",
    "load",
    "read_prompts",
    "stream_text",
]


@dataclass
class TokenLogprob:
    """A generated token with its probability under the model and the best alternatives."""

    id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass
class Completion:
    """The result of one prompt.

    text: the continuation as shown (no stop string, no end-of-text token). token_ids: every
    generated id, including those that spelled a stop string and a final end-of-text.
    finish_reason: "length" (max_new_tokens), "stop" (a stop string), "eot" (end of text), or "error" when
    the constraint could not be followed to its end: error says why, and text does not fit the constraint.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


class Event(NamedTuple):
    row: int
    text: str  # text now safe to show ("" while a character or a possible stop string is incomplete)
    token: Token | None  # the token that produced it (None only when nothing was generated)
    finish: str | None  # set on a row's last event: "length", "stop", "eot" or "error" (a constraint that failed)
    error: str | None = None  # why, when finish is "error"


class LM:
    """A model and its tokenizer, ready to write text. Get one with load(run_dir).

        >>> lm = load("runs/demo")
        >>> print(lm.generate("ROMEO:", max_new_tokens=40, temperature=0))
        >>> for piece in lm.stream("JULIET:", stop=["\\n\\n"], seed=3): print(piece, end="")
        >>> [c.text for c in lm.complete(["To be", "or not"], temperature=0, logprobs=3)]

    Settings come as a SamplingConfig, as keyword overrides of one (temperature=0, stop=[...]), or both.
    Prompts are plain text: "<|endoftext|>" or "<|user|>" typed in a prompt are characters, never control
    tokens, unless the LM was made with allow_special=True (`gradlm generate --allow-special`). An empty
    prompt starts a new document. A prompt longer than the context window is an error unless
    truncate="left", here and in every other entry point (generate_text, stream_text, the CLI). The model is
    used as it is: load() gives it in eval mode (in training mode, dropout would apply while sampling).

    Where a continuation ends: at <|endoftext|> (unless stop_at_eot=False), and for a chat-tuned model
    (chat=True; load() sets it for a run that has a chat template) also at <|end|>, where the chat
    endpoint stops. Special tokens never appear in the text. A seeded prompt writes the same text alone
    or batched with others.

    Constrained decoding (gradlm/generation/constrain.py): choices=[...], regex="...", json_schema={...},
    json_object=True or grammar="<Lark>" (one of them) make every continuation fit; it ends as soon as it
    is complete. A constraint that cannot compile is a ConfigError.

        >>> lm.generate("Dose of zorvastatin?", regex=r"[0-9]+ mg", temperature=0)
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        allow_special: bool = False,
        chat: bool = False,
        runtime: Runtime | None = None,
    ):
        self.model = model
        self.tok = tokenizer
        self.allow_special = allow_special  # read "<|endoftext|>" etc. in prompts as special tokens
        self.chat = chat
        # where it runs; int8: decode with int8 weight copies
        self.runtime = runtime or Runtime(str(model.embed_tokens.weight.device))
        # stepped synchronously, in the caller's thread
        self.engine = Engine(model, tokenizer, max_queue=1 << 30, runtime=self.runtime)

    @property
    def context_window(self) -> int:
        return self.model.cfg.block_size

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a continuation: <|endoftext|>, and <|end|> for a chat-tuned model."""
        ids = {self.tok.eot_id} if self.tok.eot_id >= 0 else set()
        if self.chat and "<|end|>" in self.tok.specials:
            ids.add(self.tok.specials["<|end|>"])
        return frozenset(ids)

    def encode_prompt(self, prompt: str, truncate: str = "error", number: int | None = None) -> list[int]:
        """Token ids of a prompt; an empty prompt is the end-of-text token (the start of a document)."""
        if truncate not in ("error", "left"):
            raise ConfigError(f"truncate must be 'error' or 'left', got {truncate!r}")
        if not prompt:
            if self.tok.eot_id < 0:
                raise ConfigError(
                    "the prompt is empty and this tokenizer has no <|endoftext|> token to start from; give a prompt"
                )
            return [self.tok.eot_id]
        ids = self.tok.encode(prompt, allow_special=self.allow_special)
        block = self.context_window
        if len(ids) > block:
            if truncate == "left":
                return ids[-block:]
            which = "the prompt" if number is None else f"prompt {number}"
            raise ConfigError(
                f"{which} is {len(ids)} tokens long but the model's context window is {block} tokens; "
                f"shorten it, or truncate it from the left (--truncate left) to keep its last {block} tokens"
            )
        return ids

    def _config(self, cfg: SamplingConfig | None, overrides: dict) -> tuple[SamplingConfig, Constraint | None]:
        """The sampling settings and the constraint (choices=, regex=, ...) among a call's keywords."""
        constraint = make_constraint(**{k: overrides.pop(k) for k in KINDS if k in overrides})
        cfg = (cfg or SamplingConfig()).with_overrides(**overrides)
        cfg.validate()
        return cfg, constraint

    def events(
        self,
        prompts: list[str],
        cfg: SamplingConfig,
        logprobs: int = 0,
        truncate: str = "error",
        stop_at_eot: bool = True,
        batch_size: int = 0,
        constraint: Constraint | None = None,
    ) -> Iterator[Event]:
        """The text of several prompts' continuations as it becomes safe to show, row by row: the
        prompts are the engine's rows, batch_size of them at a time (0 = all), and a row that finishes
        makes room for the next prompt at once."""
        ids = [self.encode_prompt(p, truncate, i + 1 if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        if batch_size < 0:
            raise ConfigError(f"batch size must not be negative, got {batch_size}")
        cfg.validate()
        if cfg.max_new_tokens == 0:
            for r in range(len(prompts)):
                yield Event(r, "", None, "length")
            return
        stops = self.stop_ids if stop_at_eot else frozenset()
        if not stop_at_eot and self.chat:  # a chat-tuned model still ends its reply at <|end|>
            stops = self.stop_ids - {self.tok.eot_id}
        requests = [Request(p, cfg, 1, stops, logprobs or None, slide=True, constraint=constraint) for p in ids]
        self.engine.max_batch = batch_size or max(len(requests), 1)
        for r, piece in self.engine.stream(requests):
            finish = piece.finish
            if finish == "stop" and piece.token.id in stops:
                finish = "eot"
            yield Event(r, piece.text, piece.token, finish, piece.error)

    def stream(
        self,
        prompt: str,
        cfg: SamplingConfig | None = None,
        *,
        truncate: str = "error",
        stop_at_eot: bool = True,
        **overrides,
    ) -> Iterator[str]:
        """Yield pieces of the continuation as they are generated (never half a character, never a
        stop string or the text after it). A constraint that fails while decoding raises ConstraintError after
        the text so far."""
        cfg, constraint = self._config(cfg, overrides)
        for ev in self.events([prompt], cfg, 0, truncate, stop_at_eot, constraint=constraint):
            if ev.text:
                yield ev.text
            if ev.error:
                raise ConstraintError(ev.error)

    def complete(
        self,
        prompts: str | list[str],
        cfg: SamplingConfig | None = None,
        *,
        logprobs: int = 0,
        truncate: str = "error",
        batch_size: int = 0,
        stop_at_eot: bool = True,
        **overrides,
    ) -> list[Completion]:
        """Continue every prompt (decoded together, batch_size at a time; 0 = all at once). With
        logprobs=N each token comes with its probability and the N most likely alternatives."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cfg, constraint = self._config(cfg, overrides)
        texts: list[list[str]] = [[] for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        lps: list[list[TokenLogprob]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        errors: list[str | None] = [None] * len(prompts)
        for ev in self.events(prompts, cfg, logprobs, truncate, stop_at_eot, batch_size, constraint):
            texts[ev.row].append(ev.text)
            if ev.token is not None:
                ids[ev.row].append(ev.token.id)
                if logprobs:
                    t = ev.token
                    top = [(i, self.tok.decode([i]), lp) for i, lp in t.top]
                    lps[ev.row].append(TokenLogprob(t.id, self.tok.decode([t.id]), t.logprob, top))
            if ev.finish:
                reasons[ev.row], errors[ev.row] = ev.finish, ev.error
        return [
            Completion(p, "".join(texts[b]), ids[b], reasons[b], lps[b] if logprobs else None, errors[b])
            for b, p in enumerate(prompts)
        ]

    def generate(self, prompt: str, cfg: SamplingConfig | None = None, *, truncate: str = "error", **overrides) -> str:
        """The whole continuation of one prompt (ConstraintError where its constraint failed while decoding)."""
        return self.generate_batch([prompt], cfg, truncate=truncate, **overrides)[0]

    def generate_batch(
        self,
        prompts: list[str],
        cfg: SamplingConfig | None = None,
        *,
        truncate: str = "error",
        batch_size: int = 0,
        **overrides,
    ) -> list[str]:
        """Continuations of several prompts, decoded together (per-row stopping). ConstraintError where a
        constraint failed while decoding: complete() keeps such rows, with finish_reason "error"."""
        done = self.complete(prompts, cfg, truncate=truncate, batch_size=batch_size, **overrides)
        failed = [c for c in done if c.error]
        if failed:
            raise ConstraintError(failed[0].error)
        return [c.text for c in done]


def load(
    run_dir: str | os.PathLike, best: bool = False, allow_special: bool = False, runtime: Runtime | None = None
) -> LM:
    """An LM from a run directory (model.safetensors, or best.safetensors with best=True), run as runtime
    says (gradlm/runtime.py: its device and weights' dtype, int8 copies for decoding on the CPU, compile;
    default: the CPU in float32); chat-tuned when the run has a chat template (fine-tuned on conversations).

        >>> lm = load("runs/demo", runtime=resolve("auto", "auto", decoding=True))      # the GPU if there is one
    """
    from gradlm.text.chat import read_chat_template
    from gradlm.rundir import load_model

    rt = runtime or Runtime()
    model, tok = load_model(run_dir, best=best, device=rt.device, dtype=rt.dtype)
    return LM(model, tok, allow_special, chat=read_chat_template(run_dir) is not None, runtime=rt)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or .jsonl with a JSON string or an
    object with a "prompt" field per line (so a prompt may hold newlines)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no prompts file at {p}; give a text file with one prompt per line, or .jsonl")
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        prompts = [ln for ln in read_text(p).splitlines() if ln.strip()]
    else:
        prompts = []
        for n, obj in jsonl_objects(p):
            obj = obj.get("prompt") if isinstance(obj, dict) else obj
            if not isinstance(obj, str):
                raise DataError(f'{p} line {n} must be a JSON string or an object with a string "prompt"')
            prompts.append(obj)
    if not prompts:
        raise DataError(f"{p} holds no prompts")
    return prompts


def stream_text(
    model: Transformer,
    tok: Tokenizer,
    prompt: str,
    cfg: SamplingConfig,
    stop_at_eot: bool = True,
    truncate: str = "error",
) -> Iterator[str]:
    """Yield pieces of generated text as tokens arrive (multi-byte characters are never cut).
    A prompt longer than the context window is an error unless truncate="left" (as everywhere)."""
    return LM(model, tok).stream(prompt, cfg, stop_at_eot=stop_at_eot, truncate=truncate)


def generate_text(model: Transformer, tok: Tokenizer, prompt: str, cfg: SamplingConfig, truncate: str = "error") -> str:
    """The whole continuation of prompt as one string."""
    return "".join(stream_text(model, tok, prompt, cfg, truncate=truncate))
