"""--size auto: the model a budget buys on this machine.

From the budget (seconds, tokens or steps), the corpus (unique training tokens) and the training speed
measured on this machine, choose the tokenizer size, depth, width, heads, context, batch, learning rate,
warmup, dropout and evaluation cadence. The rule is compute-optimal in the Chinchilla sense, tokens = TOKENS_PER_PARAM x
parameters,
with the ratio fitted by experiment for models this small (docs/benchmarks.md, "Choosing the model"),
and repeated passes over the corpus counted at a value that decays (`useful_tokens`), so a small corpus
bounds the model however long the budget.

`choose()` is a pure function of those inputs, so it is tested without a machine: the throughput is a
callable from a candidate configuration to training tokens per second, which the trainer backs with a
short probe (`Probe`) and a test with a formula. Explicit settings (`fixed`) always win.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gradlm.errors import ConfigError, flag
from gradlm.model.transformer import Transformer, ModelConfig, flops_per_token, matmul_params

# The depth/width ladder the chooser walks: (layers, width). Heads are 32 wide up to 256, then 64.
LADDER = (
    (2, 64),
    (3, 96),
    (4, 128),
    (4, 160),
    (4, 192),
    (5, 224),
    (6, 256),
    (6, 320),
    (8, 384),
    (8, 448),
    (10, 512),
    (12, 640),
    (12, 768),
    (16, 1024),
)
TOKENS_PER_PARAM = 0.3  # fitted at 90 s of Shakespeare on 2 cores (docs/benchmarks.md, "Choosing the model")
# Repeated data: the k-th pass over the corpus is worth exp(-(k-1)/REPEATS) of the first. Muennighoff et al. found
# ~15 for large models; ten-minute Shakespeare runs overfit badly when 8 passes counted in full, so 4 here.
REPEATS = 4.0
BLOCK = 128  # context window (tokens) of the small rungs; wider models get 256
MODEL_KEYS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "block_size")  # the model-shape settings
TRAIN_KEYS = ("batch", "lr", "warmup_steps", "min_lr_ratio", "eval_every", "eval_tokens")
EVALS = 8  # evaluations (and checkpoints) per run


@dataclass(frozen=True)
class Allowance:
    """What the run may spend, as --size auto sizes for it: seconds of training, tokens, or optimizer steps (the first
    one set). The run's own clock and budgets are training/budget.py's Budget."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0


@dataclass
class Choice:
    model: dict  # ModelConfig fields
    train: dict  # TrainConfig fields: TRAIN_KEYS
    params: int  # parameters in matrix multiplications (all but the embedding and the norms)
    tokens: float  # training tokens the budget buys (every pass, before repeats are discounted)
    tokens_per_s: float  # measured (or modelled) training throughput of the chosen model
    capped: bool  # the corpus, not the budget, limited the model
    reason: str  # one line: what was chosen and why


def choose_vocab(corpus_bytes: int) -> int:
    """Tokenizer size (256 bytes + merges) for a corpus: 1024 for ~1 MB of text, doubling per 8x more
    text, between 512 and 8192 (measured: 1024 beat 512 and 2048 on 1 MB of Shakespeare)."""
    steps = math.log(max(corpus_bytes, 1) / 1e6, 8)
    return int(min(8192, max(512, 1024 * 2 ** round(steps))))


def rung(i: int, vocab_size: int, fixed: dict | None = None, max_block: int = 1 << 30) -> ModelConfig | None:
    """The i-th ladder model, with the fixed model settings applied; None if they do not fit it.
    max_block: the longest context the data allows (a window needs block + 1 tokens of each split)."""
    layers, width = LADDER[i]
    head = 32 if width <= 256 else 64
    block = min(BLOCK if width <= 256 else 2 * BLOCK, max_block)
    shape = {"n_layer": layers, "d_model": width, "n_head": width // head, "block_size": block}
    shape.update(fixed or {})
    if "d_model" in (fixed or {}) and "n_head" not in fixed:  # heads of ~32 (64 above 256 wide) for the width it has
        d = shape["d_model"]
        n = max(1, d // (32 if d <= 256 else 64))
        while d % n:
            n -= 1
        shape["n_head"] = n
    cfg = ModelConfig(vocab_size=vocab_size, **shape)
    try:
        cfg.validate()
    except ConfigError:  # e.g. a fixed --n-head that does not divide this width
        return None
    return cfg


def batch_for(tokens: float, block: int) -> int:
    """Windows per step: 8 for a budget of about a million tokens, growing with the square root of the
    tokens, so that short runs take many small steps and long runs larger ones (measured at 90 s of
    Shakespeare: batch 8 beat 16 and 32)."""
    windows = 8 * math.sqrt(max(tokens, 1) / 1e6) * (BLOCK / block)
    return int(min(256, max(4, 2 ** round(math.log2(max(windows, 1))))))


def useful_tokens(tokens: float, corpus_tokens: int, repeats: float = REPEATS) -> float:
    """What `tokens` of training are worth as data when the corpus holds corpus_tokens: the first pass
    counts in full, later passes less and less (Muennighoff et al., 2023, "Scaling Data-Constrained
    Language Models"): corpus * R (1 - exp(-epochs / R)), never more than corpus * R."""
    if corpus_tokens <= 0:
        return 0.0
    return corpus_tokens * repeats * (1 - math.exp(-tokens / corpus_tokens / repeats))


def dropout_for(epochs: float) -> float:
    """Dropout for a run of this many passes over its corpus: none while the data is mostly fresh, more
    as it repeats (measured on Shakespeare: 6 x 256 over 7-10 passes did better with 0.2 than without; 4 x 192
    over 3 passes did worse with 0.1: 2.545 against 2.480 bits/char)."""
    return 0.0 if epochs <= 4 else (0.1 if epochs <= 8 else 0.2)


def lr_for(cfg: ModelConfig, batch: int) -> float:
    """AdamW peak learning rate: 3e-3 at width 192 and batch 8 (measured), scaled as sqrt(batch / width)
    (the square-root rule for Adam's batch size, 1/sqrt for width), at most 8e-3."""
    return round(min(8e-3, 3e-3 * math.sqrt(batch / 8 * 192 / cfg.d_model)), 5)


def choose(
    budget: Allowance,
    corpus_tokens: int,
    tokens_per_s: Callable[[ModelConfig, int, float], float],
    vocab_size: int,
    fixed: dict | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    repeats: float = REPEATS,
    max_block: int = 1 << 30,
) -> Choice:
    """The largest ladder model whose budget buys at least tokens_per_param useful tokens per parameter
    (repeated passes over the corpus worth less and less: `useful_tokens`); then its batch, learning rate,
    warmup, dropout and evaluation cadence.

    tokens_per_s(cfg, batch, dropout) is the training throughput of a candidate (only asked for time
    budgets): the ladder is compared at batch 16 without dropout (unless the batch is fixed), then the
    chosen model is timed again at the batch and dropout its token count gives it.
    fixed: settings the user gave (MODEL_KEYS, TRAIN_KEYS and dropout); they are kept as given."""
    fixed = dict(fixed or {})
    cfg, tps, tokens, useful = _largest_fitting(
        budget, corpus_tokens, tokens_per_s, vocab_size, fixed, tokens_per_param, repeats, max_block
    )
    batch, dropout = _batch_and_dropout(tokens, cfg, fixed, corpus_tokens)
    if budget.seconds:
        batch, dropout, tps, tokens = _time_as_trained(
            cfg, budget.seconds, tokens_per_s, fixed, corpus_tokens, batch, dropout
        )
        useful = useful_tokens(tokens, corpus_tokens, repeats)
    params = matmul_params(cfg)
    epochs = tokens / max(corpus_tokens, 1)
    capped = epochs > repeats  # past R passes the corpus, not the budget, bounds the model
    train = _train_settings(cfg, batch, tokens, fixed)
    model = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model["dropout"] = dropout
    spend = (
        f"{budget.seconds:g} s at {tps:,.0f} tok/s measured"
        if budget.seconds
        else (f"a budget of {budget.tokens:,} tokens" if budget.tokens else f"{budget.steps:,} steps")
    )
    why = (
        f"the corpus ({corpus_tokens:,} tokens, worth at most {repeats:g} passes) caps it"
        if capped
        else f"≈ {useful / max(params, 1):.1f} useful tokens/param"
    )
    reason = (
        f"size auto: {cfg.n_layer} layers x {cfg.d_model} ({cfg.n_head} heads, context {cfg.block_size}), "
        f"~{params / 1e6:.2f}M params, "
        f"batch {batch}, lr {train['lr']:g}, dropout {model['dropout']:g}; ~{_count(tokens)} tokens ({epochs:.1f} "
        f"epochs) in {spend}, {why}"
    )
    return Choice(
        model=model, train=train, params=params, tokens=tokens, tokens_per_s=tps, capped=capped, reason=reason
    )


def _candidate(
    i: int, budget: Allowance, tokens_per_s: Callable, vocab_size: int, fixed: dict, fixed_model: dict, max_block: int
) -> tuple[ModelConfig, float, float] | None:
    """(model, throughput, training tokens the budget buys) of the i-th rung; None if the fixed settings do
    not fit it. Time budgets are compared at batch 16 (or the fixed batch) without dropout."""
    cfg = rung(i, vocab_size, fixed_model, max_block)
    if cfg is None:
        return None
    batch = int(fixed["batch"]) if "batch" in fixed else None
    if budget.seconds:
        b = batch or 16
        tps = tokens_per_s(cfg, b, 0.0)
        tokens = tps * budget.seconds
    elif budget.tokens:
        tps, tokens = 0.0, float(budget.tokens)
    else:
        b = batch or batch_for(budget.steps * 16 * cfg.block_size, cfg.block_size)
        tps, tokens = 0.0, float(budget.steps * b * cfg.block_size)
    return cfg, tps, tokens


def _largest_fitting(
    budget: Allowance,
    corpus_tokens: int,
    tokens_per_s: Callable,
    vocab_size: int,
    fixed: dict,
    tokens_per_param: float,
    repeats: float,
    max_block: int,
) -> tuple[ModelConfig, float, float, float]:
    """(model, throughput, tokens, useful tokens) of the largest rung that still gets tokens_per_param useful
    tokens per parameter (the smallest that fits the fixed settings if none does); walking up the ladder
    stops at the first that does not."""
    fixed_model = {k: v for k, v in fixed.items() if k in MODEL_KEYS}
    chosen = None
    for i in range(len(LADDER)):
        c = _candidate(i, budget, tokens_per_s, vocab_size, fixed, fixed_model, max_block)
        if c is None:
            continue
        cfg, tps, tokens = c
        useful = useful_tokens(tokens, corpus_tokens, repeats)
        fits = useful >= tokens_per_param * matmul_params(cfg)
        if chosen is None or fits:
            chosen = (cfg, tps, tokens, useful)
        if not fits:
            break
    if chosen is None:
        shape = ", ".join(f"{flag(k)} {v}" for k, v in fixed_model.items())
        raise ConfigError(
            f"--size auto found no model of its ladder that fits {shape}; give the whole shape (e.g. --d-model as "
            "well) or drop --size auto"
        )
    return chosen


def _batch_and_dropout(tokens: float, cfg: ModelConfig, fixed: dict, corpus_tokens: int) -> tuple[int, float]:
    """The batch and dropout a run of this many tokens gets (fixed ones kept)."""
    batch = int(fixed["batch"]) if "batch" in fixed else batch_for(tokens, cfg.block_size)
    return batch, fixed["dropout"] if "dropout" in fixed else dropout_for(tokens / max(corpus_tokens, 1))


def _time_as_trained(
    cfg: ModelConfig,
    seconds: float,
    tokens_per_s: Callable,
    fixed: dict,
    corpus_tokens: int,
    batch: int,
    dropout: float,
) -> tuple[int, float, float, float]:
    """(batch, dropout, throughput, tokens) of the chosen model timed as it will train. The ladder was timed
    at one batch without dropout, and a smaller batch or dropout is slower per token: time again until the
    settings agree with the measurement."""
    tried = set()
    while True:
        tried.add((batch, dropout))
        tps = tokens_per_s(cfg, batch, dropout)
        tokens = tps * seconds
        settled = _batch_and_dropout(tokens, cfg, fixed, corpus_tokens)
        if settled in tried:  # agreed, or on the edge between two settings: keep the one just measured
            return batch, dropout, tps, tokens
        batch, dropout = settled


def _train_settings(cfg: ModelConfig, batch: int, tokens: float, fixed: dict) -> dict:
    """TRAIN_KEYS for a run of `tokens` at this batch (fixed ones kept)."""
    steps = max(1.0, tokens / (batch * cfg.block_size))
    return {
        "batch": str(batch),
        "lr": fixed.get("lr") or lr_for(cfg, batch),
        # AdamW needs ~50 steps before its full learning rate (measured: 20 was far worse, 50 to 200 equal)
        "warmup_steps": fixed["warmup_steps"]
        if "warmup_steps" in fixed
        else int(min(max(50, 0.05 * steps), steps / 4)),
        "min_lr_ratio": fixed.get("min_lr_ratio", 0.0),  # a fixed budget decays to zero (measured: better than 0.1)
        # about EVALS evaluations, each over ~1% of the run's tokens (two passes, train and validation,
        # at a third of a training step's cost each: ~5% of the budget in all)
        "eval_every": fixed.get("eval_every") or max(10, int(steps / EVALS)),
        "eval_tokens": fixed.get("eval_tokens") or int(min(32768, max(4096, tokens / 100))),
    }


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def _run_queue_wait() -> dict[str, float]:
    """Seconds each thread of this process has spent runnable but waiting for a core, by thread id (Linux's
    per-thread schedstat; {} elsewhere): a difference across a step is each thread's wait in it."""
    waits = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                waits[tid] = int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return {}
    return waits


def own_time(fn: Callable[[], object]) -> float:
    """Wall time of fn() less the longest time one of our threads waited for a core while another process
    held it: what the step costs this machine, not what a busy neighbour made it cost. Unloaded the two are
    equal; under one busy core of two a training step's wall time grows ~2.4-2.9x and this ~1.0-1.8x
    (docs/benchmarks.md, "The probe under load"). Where schedstat is missing it is the wall time."""
    before = _run_queue_wait()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = _run_queue_wait()
    waited = max((after[k] - before.get(k, 0.0) for k in after), default=0.0)
    return max(wall - waited, 0.5 * wall)  # never credit more than half: a bound on what schedstat can explain


class Probe:
    """Training throughput of candidate models on this machine, measured by timing a few real steps
    (forward, backward, AdamW update, in the run's dtype) on batches of the run's data: the fastest of them,
    each less the time a busy neighbour kept our threads waiting for a core (`own_time`), so the choice
    follows the machine and not its momentary load. Results are memoised; the probe stops measuring new
    shapes once it has spent `limit_s` seconds and then extrapolates from the FLOP rate of the largest shape
    it did measure."""

    def __init__(self, sample: Callable[[int, int], tuple], autocast, device: str, limit_s: float):
        self.sample, self.autocast, self.device, self.limit_s = sample, autocast, device, limit_s
        self.spent, self.results = 0.0, {}
        self.flops_rate = 0.0

    def __call__(self, cfg: ModelConfig, batch: int, dropout: float = 0.0) -> float:
        import torch

        key = (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.block_size, batch, dropout)
        if key in self.results:
            return self.results[key]
        flops = flops_per_token(cfg)
        if self.spent >= self.limit_s and self.flops_rate:
            return self.flops_rate / flops
        t_start = time.perf_counter()
        model = Transformer(replace(cfg, dropout=dropout)).to(self.device)  # in training mode: dropout costs time
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = self.sample(batch, cfg.block_size)
        times = []

        def step() -> None:
            with self.autocast():
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()  # time the step, not the launch of its kernels

        for _ in range(6):
            times.append(own_time(step))
            if time.perf_counter() - t_start > self.limit_s / 3:
                break
        self.spent += time.perf_counter() - t_start
        step = min(times[1:]) if len(times) > 1 else times[0]  # the first step pays one-off costs
        tps = batch * cfg.block_size / step
        self.results[key] = tps
        self.flops_rate = max(self.flops_rate, tps * flops)
        return tps
