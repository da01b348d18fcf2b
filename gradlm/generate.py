"""The generation loop: logits -> sampling controls -> next token -> append -> repeat, with a KV cache.

The prompts run through the model once (prefill); after that each step feeds only the newest token of
each row, reusing the cached keys and values, so a step costs O(context) instead of O(context^2).
Several prompts decode together as one batch: shorter prompts are left-padded (the cache masks the
padding and gives each row rotary positions from 0), and a row that finishes leaves the batch. When a
row's context fills the window, it keeps its newest half and re-runs it once (a sliding window); the
other rows keep their caches, so a row's text never depends on what it is batched with.

Sampling controls, applied in this order to the last position's logits:
    repetition_penalty   divide positive / multiply negative logits of tokens already present (CTRL)
    frequency_penalty    subtract penalty x (times the token was generated)        (OpenAI)
    presence_penalty     subtract penalty once for any token already generated     (OpenAI)
    temperature          divide by T; T = 0 means greedy (argmax)
    top_k                keep the k most likely tokens
    top_p                keep the smallest set of most likely tokens whose probability reaches p
    min_p                keep tokens at least min_p x the probability of the most likely one
Stop strings are matched on the decoded text, across token boundaries, and never shown: text that
could be the start of a stop string is held back until it is known not to be one.

The generation loop knows token ids (Generation); text lives at its edge (LM). Example:
    >>> lm = load("runs/demo")
    >>> for piece in lm.stream("ROMEO:", max_new_tokens=50, stop=["\\n\\n"], seed=1):
    ...     print(piece, end="", flush=True)
    >>> lm.generate_batch(["To be", "KING"], temperature=0)      # greedy, one batch
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from gradlm.corpus import jsonl_objects, read_text
from gradlm.errors import ConfigError, DataError, check_field_types
from gradlm.model import GPT, KVCache
from gradlm.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = field(default=200, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest set with this probability mass (1 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability (0 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages tokens already in the text (1 = off)"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtract this x count of each generated token from its logit"})
    presence_penalty: float = field(default=0.0, metadata={"help": "subtract this from the logit of every token generated before"})
    seed: int | None = field(default=None, metadata={"help": "random seed: the same seed and settings give the same text"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop when this text appears; it is not included (repeat for several)"})

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        check_field_types(self)

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max new tokens must not be negative, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min-p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            problems.append(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty text")
        if problems:
            raise ConfigError("invalid sampling settings: " + "; ".join(problems))

    def with_overrides(self, **overrides) -> SamplingConfig:
        """A copy with some fields changed; an unknown name is a ConfigError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown sampling setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)


# ---- sampling ------------------------------------------------------------------------------------------


def penalties_active(cfg: SamplingConfig) -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.frequency_penalty != 0 or cfg.presence_penalty != 0


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: token in prompt or output; counts (B, V): times generated."""
    if cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.frequency_penalty:
        logits = logits - cfg.frequency_penalty * counts
    if cfg.presence_penalty:
        logits = logits - cfg.presence_penalty * (counts > 0)
    return logits


def _truncate_sorted(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """top-p and min-p on logits (B, K) already sorted in descending order (removed -> -inf)."""
    if cfg.top_p < 1.0:
        probs = logits.softmax(-1)
        # Drop a token when the mass of the tokens before it already reaches p (the top one always stays).
        logits = logits.masked_fill((probs.cumsum(-1) - probs) >= cfg.top_p, float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs[:, :1], float("-inf"))
    return logits


def candidates(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k / top-p / min-p: the one implementation of the sampling filters.

    logits (B, V) -> (candidate logits (B, K), their ids (B, K)); removed candidates get -inf. With
    top-k only the k best are sorted (no sort or softmax over the whole vocabulary); with neither
    top-k nor top-p nothing is sorted and ids is None (the candidates are the vocabulary, in order).
    """
    logits = logits.float() / cfg.temperature
    V = logits.size(-1)
    if 0 < cfg.top_k < V:
        values, order = torch.topk(logits, cfg.top_k, dim=-1)  # (B, k), descending
    elif cfg.top_p < 1.0:
        values, order = torch.sort(logits, dim=-1, descending=True)
    else:  # min-p only compares with the maximum: no sort needed
        if cfg.min_p > 0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return logits, None
    return _truncate_sorted(values, cfg), order


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The filtered logits over the whole vocabulary (B, V): softmax of the result is the distribution
    next_token samples from (with temperature > 0)."""
    values, order = candidates(logits, cfg)
    return values if order is None else torch.full_like(logits, float("-inf"), dtype=values.dtype).scatter(-1, order, values)


def next_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One id per row of logits (B, V) -> (B,), drawn from the filtered distribution (see candidates).
    temperature 0 is argmax (the other controls then change nothing). Each row uses one uniform number:
    from gen, or given as uniform (B, 1) (rows that keep random generators of their own)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    values, order = candidates(logits, cfg)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], 1, generator=gen, device=logits.device)
    pick = draw(values.softmax(-1), uniform)  # (B, 1)
    return (pick if order is None else order.gather(-1, pick)).squeeze(-1)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of probs (B, K) -> (B, 1) by inverse transform sampling: the first index whose
    cumulative probability reaches the row's uniform number (B, 1) in [0, 1). torch.multinomial draws a
    random number per vocabulary entry, which made it half of a 16-row serving step (benchmarks/serve.py).
    Entries of probability 0 are never picked."""
    cdf = probs.float().cumsum(-1)  # (B, K)
    u = (uniform.to(cdf.device) * cdf[:, -1:]).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1)


# ---- the loop over token ids --------------------------------------------------------------------------


class Token(NamedTuple):
    """One generated token of one row. logprob and top (the best alternatives, (id, logprob) pairs)
    are under the model's own distribution, log softmax of its logits, before any sampling control;
    they are filled in only when logprobs were asked for."""

    row: int
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Generation:
    """Decode several prompts (lists of token ids) together; iterate to get each step's new tokens.

    Each step yields one Token per row still running (rows keep their index in `prompts`). A row ends
    when it emits one of stop_ids, when finish(row) is called (the text layer does this for stop
    strings), or after max_new_tokens; an ended row leaves the batch and its KV cache rows are dropped.

        >>> for step in Generation(model, [[1, 2, 3], [4]], SamplingConfig(temperature=0)):
        ...     print([(t.row, t.id) for t in step])

    cache: continue a KV cache (of one row, no padding) that already holds the first cache.pos ids of
    the single prompt; only the rest is run through the model (a chat reuses its conversation so).
    The caller keeps the cache: afterwards it holds the prompt and every generated token but the
    last, as long as the window did not fill (prompt + max_new_tokens <= the cache's length).
    """

    def __init__(self, model: GPT, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: Iterable[int] = (), logprobs: int = 0, cache: KVCache | None = None):
        cfg.validate()
        block = model.cfg.block_size
        if not prompts:
            raise ConfigError("no prompts to generate from")
        for i, p in enumerate(prompts):
            if not p:
                raise ConfigError(f"prompt {i + 1} is empty: give at least one token")
            if len(p) > block:
                raise ConfigError(f"prompt {i + 1} has {len(p)} tokens, more than the context window of {block}")
        if not 0 <= logprobs <= model.cfg.vocab_size:
            raise ConfigError(f"logprobs must be between 0 and the vocabulary size {model.cfg.vocab_size}, got {logprobs}")
        self.model, self.prompts, self.cfg, self.logprobs = model, [list(p) for p in prompts], cfg, logprobs
        self.stop_ids = frozenset(stop_ids)
        self._finished: set[int] = set()
        if cache is not None and (len(prompts) != 1 or cache.pad is not None or cache.kv.shape[1] != 1 or not 0 <= cache.pos < len(prompts[0])):
            raise ValueError("a reused KV cache must have one unpadded row holding fewer tokens than the one prompt")
        self.cache = cache

    def finish(self, row: int) -> None:
        """End this row: it is dropped from the batch before the next step."""
        self._finished.add(row)

    def __iter__(self) -> Iterator[list[Token]]:
        return self._steps()

    def _prefill(self, seqs: list[list[int]], max_len: int):
        """Run the (left-padded) sequences through the model once: a cache holding them, last logits."""
        device = self.model.embed_tokens.weight.device
        P = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), P, dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        pad = [P - len(s) for s in seqs]
        cache = self.model.new_cache(len(seqs), max_len, pad=pad if any(pad) else None)
        logits = self.model.infer(x.to(device), cache, last_only=True)[:, -1]  # (B, V)
        return cache, logits

    def _slide(self, cache, histories: list[list[int]]):
        """A new cache with room for the next token, when the current one is full (pos == block).

        Each row slides exactly when it would if decoded alone: a row whose context (plus the token
        about to be fed) would exceed the window keeps its newest block // 2 tokens, re-run through
        the model (rotary positions restart at 0); every other row keeps its cached keys and values,
        moved left over the padding it no longer needs. So batching never changes a row's text.
        histories: each batch row's ids, ending with the token about to be fed.
        """
        block, pos = self.model.cfg.block_size, cache.pos
        keep = max(1, block // 2) - 1  # cached tokens of a slid row (its newest token is fed next)
        pads = cache.pad.tolist() if cache.pad is not None else [0] * len(histories)
        lengths = [pos - p for p in pads]  # real tokens of each row in the cache
        slid = [b for b, n in enumerate(lengths) if n + 1 > block]
        for b in slid:
            lengths[b] = keep
        P = max(lengths)
        new_pad = [P - n for n in lengths]
        new = self.model.new_cache(len(histories), block, pad=new_pad if any(new_pad) else None)
        for b, n in enumerate(lengths):
            if b not in slid and n:
                new.kv[:, b, :, P - n : P] = cache.kv[:, b, :, pads[b] : pos]
        if slid and keep:
            device = self.model.embed_tokens.weight.device
            sub = self.model.new_cache(len(slid), keep)
            self.model.infer(torch.tensor([histories[b][-keep - 1 : -1] for b in slid], device=device), sub, last_only=True)
            for i, b in enumerate(slid):
                new.kv[:, b, :, P - keep : P] = sub.kv[:, i]
        new.pos = P
        return new

    @torch.inference_mode()
    def _steps(self) -> Iterator[list[Token]]:
        model, cfg, n_lp = self.model, self.cfg, self.logprobs
        if cfg.max_new_tokens == 0:
            return
        block, V = model.cfg.block_size, model.cfg.vocab_size
        device = model.embed_tokens.weight.device
        gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        history = [list(p) for p in self.prompts]  # prompt + generated ids of every row (for the sliding window)
        rows = list(range(len(history)))  # the original index of each batch row, in cache order
        stop_ids, finished = self.stop_ids, self._finished
        penalise = penalties_active(cfg)
        if penalise:  # (B, V) bookkeeping only when a penalty is on
            seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
            for b, p in enumerate(history):
                seen[b, torch.tensor(p, device=device)] = True
            counts = torch.zeros(len(rows), V, device=device)
        if self.cache is not None:  # it holds the prompt's first cache.pos ids: run the rest
            cache = self.cache
            logits = model.infer(torch.tensor([history[0][cache.pos :]], device=device), cache, last_only=True)[:, -1]
        else:  # the cache holds the longest prompt plus every new token, up to the context window
            cache, logits = self._prefill(history, min(block, max(map(len, history)) + cfg.max_new_tokens))
        for step in range(cfg.max_new_tokens):
            scores = apply_penalties(logits.float(), seen, counts, cfg) if penalise else logits
            nxt = next_token(scores, cfg, gen)  # (B,)
            ids = nxt.tolist()
            if n_lp:
                lp = torch.log_softmax(logits.float(), dim=-1)
                chosen = lp.gather(1, nxt[:, None]).squeeze(1).tolist()
                best = lp.topk(n_lp, dim=-1)
                best_v, best_i = best.values.tolist(), best.indices.tolist()
                yield [Token(r, t, chosen[b], tuple(zip(best_i[b], best_v[b]))) for b, (r, t) in enumerate(zip(rows, ids))]
            else:
                yield [Token(r, t) for r, t in zip(rows, ids)]
            if step == cfg.max_new_tokens - 1:
                return
            for r, t in zip(rows, ids):
                history[r].append(t)
            keep = [b for b, (r, t) in enumerate(zip(rows, ids)) if t not in stop_ids and r not in finished]
            if len(keep) < len(rows):  # finished rows leave the batch
                if not keep:
                    return
                sel = torch.tensor(keep, device=device)
                cache.reorder(sel)
                nxt = nxt.index_select(0, sel)
                rows = [rows[b] for b in keep]
                if penalise:
                    seen, counts = seen.index_select(0, sel), counts.index_select(0, sel)
            if penalise:
                counts.scatter_add_(1, nxt[:, None], torch.ones(len(rows), 1, device=device))
                seen.scatter_(1, nxt[:, None], True)
            if cache.pos >= cache.max_len:  # the window is full: the rows that need it slide (see _slide)
                cache = self._slide(cache, [history[r] for r in rows])
            logits = model.infer(nxt[:, None], cache)[:, -1]


def generate_ids(model: GPT, prompt: list[int], cfg: SamplingConfig, stop_ids: Iterable[int] = frozenset()) -> Iterator[int]:
    """Yield generated ids one at a time (streaming). Stops at max_new_tokens or after a stop id.
    A prompt longer than the context window keeps its newest tokens."""
    for step in Generation(model, [list(prompt)[-model.cfg.block_size :]], cfg, stop_ids):
        yield step[0].id


# ---- text at the edge ---------------------------------------------------------------------------------


class StopMatcher:
    """Finds stop strings in text that arrives in pieces, holding back what might be the start of one.

    push(piece) returns (text that is safe to show, whether a stop string was found). The held-back
    text is the longest tail that is a prefix of some stop string; it is released as soon as the next
    piece shows it is not one, or by flush() when generation ends for another reason.

        >>> m = StopMatcher(["\\n\\n"])
        >>> m.push("Hello\\n"), m.push("\\nmore")
        (('Hello', False), ('', True))
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = 0
        for n in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                hold = n
                break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


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
    finish_reason: "length" (max_new_tokens), "stop" (a stop string) or "eot" (end of text).
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


class Event(NamedTuple):
    row: int
    text: str  # text now safe to show ("" while a character or a possible stop string is incomplete)
    token: Token | None  # the token that produced it (None for the final flush)
    finish: str | None  # set on a row's last event: "length", "stop" or "eot"


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
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, allow_special: bool = False):
        self.model = model
        self.tok = tokenizer
        self.allow_special = allow_special  # read "<|endoftext|>" etc. in prompts as special tokens

    @property
    def context_window(self) -> int:
        return self.model.cfg.block_size

    def encode_prompt(self, prompt: str, truncate: str = "error", number: int | None = None) -> list[int]:
        """Token ids of a prompt; an empty prompt is the end-of-text token (the start of a document)."""
        if truncate not in ("error", "left"):
            raise ConfigError(f"truncate must be 'error' or 'left', got {truncate!r}")
        if not prompt:
            if self.tok.eot_id < 0:
                raise ConfigError("the prompt is empty and this tokenizer has no <|endoftext|> token to start from; give a prompt")
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

    def _config(self, cfg: SamplingConfig | None, overrides: dict) -> SamplingConfig:
        cfg = (cfg or SamplingConfig()).with_overrides(**overrides)
        cfg.validate()
        return cfg

    def events(self, prompts: list[str], cfg: SamplingConfig, logprobs: int = 0, truncate: str = "error", stop_at_eot: bool = True) -> Iterator[Event]:
        """The text of several prompts' continuations as it becomes safe to show, row by row."""
        ids = [self.encode_prompt(p, truncate, i + 1 if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        eot = self.tok.eot_id
        stop_ids = {eot} if stop_at_eot and eot >= 0 else set()
        run = Generation(self.model, ids, cfg, stop_ids, logprobs)
        decoders = [StreamDecoder(self.tok) for _ in prompts]
        matchers = [StopMatcher(cfg.stop) for _ in prompts]
        done = [False] * len(prompts)

        def close(row: int, token: Token | None, reason: str) -> Event:
            text, hit = matchers[row].push(decoders[row].flush())
            done[row] = True
            return Event(row, text if hit else text + matchers[row].flush(), token, "stop" if hit else reason)

        for step in run:
            for t in step:
                r = t.row
                if t.id in stop_ids:
                    yield close(r, t, "eot")
                    continue
                text, hit = matchers[r].push(decoders[r].push(t.id))
                if hit:
                    done[r] = True
                    run.finish(r)
                    yield Event(r, text, t, "stop")
                else:
                    yield Event(r, text, t, None)
        for r in range(len(prompts)):
            if not done[r]:
                yield close(r, None, "length")

    def stream(self, prompt: str, cfg: SamplingConfig | None = None, *, truncate: str = "error", stop_at_eot: bool = True, **overrides) -> Iterator[str]:
        """Yield pieces of the continuation as they are generated (never half a character, never a
        stop string or the text after it)."""
        for ev in self.events([prompt], self._config(cfg, overrides), 0, truncate, stop_at_eot):
            if ev.text:
                yield ev.text

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
        cfg = self._config(cfg, overrides)
        if batch_size < 0:
            raise ConfigError(f"batch size must not be negative, got {batch_size}")
        size = batch_size or max(len(prompts), 1)
        out: list[Completion] = []
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            texts = [[] for _ in chunk]
            ids: list[list[int]] = [[] for _ in chunk]
            lps: list[list[TokenLogprob]] = [[] for _ in chunk]
            reasons = ["length"] * len(chunk)
            for ev in self.events(chunk, cfg, logprobs, truncate, stop_at_eot):
                texts[ev.row].append(ev.text)
                if ev.token is not None:
                    ids[ev.row].append(ev.token.id)
                    if logprobs:
                        t = ev.token
                        top = [(i, self.tok.decode([i]), lp) for i, lp in t.top]
                        lps[ev.row].append(TokenLogprob(t.id, self.tok.decode([t.id]), t.logprob, top))
                if ev.finish:
                    reasons[ev.row] = ev.finish
            for b, p in enumerate(chunk):
                out.append(Completion(p, "".join(texts[b]), ids[b], reasons[b], lps[b] if logprobs else None))
        return out

    def generate(self, prompt: str, cfg: SamplingConfig | None = None, *, truncate: str = "error", **overrides) -> str:
        """The whole continuation of one prompt."""
        return self.complete([prompt], cfg, truncate=truncate, **overrides)[0].text

    def generate_batch(self, prompts: list[str], cfg: SamplingConfig | None = None, *, truncate: str = "error", batch_size: int = 0, **overrides) -> list[str]:
        """Continuations of several prompts, decoded together (per-row stopping)."""
        return [c.text for c in self.complete(prompts, cfg, truncate=truncate, batch_size=batch_size, **overrides)]


def load(run_dir: str | os.PathLike, best: bool = False, device: str = "cpu", allow_special: bool = False) -> LM:
    """An LM from a run directory (model.safetensors, or best.safetensors with best=True)."""
    from gradlm.rundir import load_model

    model, tok = load_model(run_dir, best=best, device=device)
    return LM(model, tok, allow_special)


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
                raise DataError(f"{p} line {n} must be a JSON string or an object with a string \"prompt\"")
            prompts.append(obj)
    if not prompts:
        raise DataError(f"{p} holds no prompts")
    return prompts


def stream_text(model: GPT, tok: Tokenizer, prompt: str, cfg: SamplingConfig, stop_at_eot: bool = True, truncate: str = "error") -> Iterator[str]:
    """Yield pieces of generated text as tokens arrive (multi-byte characters are never cut).
    A prompt longer than the context window is an error unless truncate="left" (as everywhere)."""
    return LM(model, tok).stream(prompt, cfg, stop_at_eot=stop_at_eot, truncate=truncate)


def generate_text(model: GPT, tok: Tokenizer, prompt: str, cfg: SamplingConfig, truncate: str = "error") -> str:
    """The whole continuation of prompt as one string."""
    return "".join(stream_text(model, tok, prompt, cfg, truncate=truncate))
