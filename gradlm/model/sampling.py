"""The sampler: the settings that pick each next token, and the one implementation of each control.

Applied in this order to a row's next-token logits:
    repetition_penalty   divide positive / multiply negative logits of tokens already present (CTRL)
    frequency_penalty    subtract penalty x (times the token was generated)        (OpenAI)
    presence_penalty     subtract penalty once for any token already generated     (OpenAI)
    temperature          divide by T; T = 0 means greedy (argmax)
    top_k                keep the k most likely tokens
    top_p                keep the smallest set of most likely tokens whose probability reaches p
    min_p                keep tokens at least min_p x the probability of the most likely one
The engine (gradlm/generation/engine.py) calls these for every row it decodes, and gradlm/model/infer.py's decode() for
the
one-row decodes of training's samples; nothing else samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from gradlm.errors import ConfigError, check_field_types


@dataclass
class SamplingConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = field(default=200, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling: smallest set with this probability mass (1 = off)"}
    )
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability (0 = off)"})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "> 1 discourages tokens already in the text (1 = off)"}
    )
    frequency_penalty: float = field(
        default=0.0, metadata={"help": "subtract this x count of each generated token from its logit"}
    )
    presence_penalty: float = field(
        default=0.0, metadata={"help": "subtract this from the logit of every token generated before"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "random seed: the same seed and settings give the same text"}
    )
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "stop when this text appears; it is not included (repeat for several)"}
    )

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


def apply_penalties(
    logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, cfg: SamplingConfig
) -> torch.Tensor:
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


def next_token(
    logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
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
