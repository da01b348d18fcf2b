"""The generation loop: logits -> sampling controls -> next token -> append -> repeat, with a KV cache.

The prompt runs through the model once (prefill); after that each step feeds only the newest token,
reusing the cached keys and values, so a step costs O(context) instead of O(context^2). When the
context window fills, the oldest half is dropped and the rest re-run once (a sliding window).

Sampling controls, applied in this order to the last position's logits:
    repetition_penalty   divide positive / multiply negative logits of tokens already present (CTRL)
    frequency_penalty    subtract penalty x (times the token was generated)        (OpenAI)
    presence_penalty     subtract penalty once for any token already generated     (OpenAI)
    temperature          divide by T; T = 0 means greedy (argmax)
    top_k                keep the k most likely tokens
    top_p                keep the smallest set of most likely tokens whose probability reaches p
    min_p                keep tokens at least min_p x the probability of the most likely one
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gradlm.errors import ConfigError
from gradlm.model import GPT
from gradlm.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = field(default=200, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest set with this probability mass (1 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability (0 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages tokens already in the text (1 = off)"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtract this x count of each generated token from its logit"})
    presence_penalty: float = field(default=0.0, metadata={"help": "subtract this from the logit of every token generated before"})
    seed: int | None = field(default=None, metadata={"help": "random seed: the same seed and settings give the same text"})

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max new tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if problems:
            raise ConfigError("invalid sampling settings: " + "; ".join(problems))


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


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p truncation (removed tokens get -inf). logits (B, V)."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass of the tokens before it already reaches p (the top one always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """One id per row of logits (B, V) -> (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model: GPT, prompt: list[int], cfg: SamplingConfig, stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Yield generated ids one at a time (streaming). Stops at max_new_tokens or after a stop id."""
    cfg.validate()
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    block = model.cfg.block_size
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    V = model.cfg.vocab_size
    counts = torch.zeros(1, V, device=device)
    seen = torch.zeros(1, V, dtype=torch.bool, device=device)
    seen[0, torch.tensor(prompt, device=device)] = True
    ids = list(prompt[-block:])

    def prefill(context: list[int]):
        cache = model.new_cache(1, block)
        logits = model(torch.tensor([context], device=device), cache=cache, last_only=True)
        return cache, logits[:, -1]

    cache, logits = prefill(ids)
    for _ in range(cfg.max_new_tokens):
        nxt = next_token(apply_penalties(logits.float(), seen, counts, cfg), cfg, gen)
        t = int(nxt)
        yield t
        if t in stop_ids:
            return
        counts[0, t] += 1
        seen[0, t] = True
        ids.append(t)
        if cache.pos >= block:  # window full: keep the newest half and re-run it once
            ids = ids[-(block // 2) :]
            cache, logits = prefill(ids)
        else:
            logits = model(nxt.view(1, 1), cache=cache)[:, -1]


def stream_text(model: GPT, tok: Tokenizer, prompt: str, cfg: SamplingConfig, stop_at_eot: bool = True) -> Iterator[str]:
    """Yield pieces of generated text as tokens arrive (multi-byte characters are never cut)."""
    prompt_ids = tok.encode(prompt, allow_special=True) if prompt else [tok.eot_id]
    dec = StreamDecoder(tok)
    stop_ids = {tok.eot_id} if stop_at_eot else set()
    for t in generate_ids(model, prompt_ids, cfg, stop_ids):
        if t in stop_ids:
            break
        piece = dec.push(t)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


def generate_text(model: GPT, tok: Tokenizer, prompt: str, cfg: SamplingConfig) -> str:
    """The whole continuation of prompt as one string."""
    return "".join(stream_text(model, tok, prompt, cfg))
