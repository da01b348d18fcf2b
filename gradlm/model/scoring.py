"""The one scorer: masked next-token loss and bits per byte over a stream of windows.

Training's validation, fine-tuning's validation and `gradlm eval` measure a model the same way; only
the windows they feed it differ. A window is a batch of inputs x (B, T) and targets y (B, T), where
y[b, t] is the token that should follow x[b, :t+1], or -1 where nothing is scored (padding, prompts
of a conversation, tokens an earlier overlapping window already scored):

    loss           summed cross-entropy (nats) of the scored targets / their number
    bits per byte  the loss in bits of the scored targets that stand for bytes / those bytes: independent
                   of the tokenizer, so models with different vocabularies compare fairly. Special tokens
                   (<|endoftext|>, <|end|>) count in the loss but cover no bytes.

The windows each command uses:
    spaced_windows   training's validation: up to --eval-tokens of evenly spaced, non-overlapping windows
    sliding_windows  `gradlm eval`: every token scored once, each with at least (context - stride) before it
    gradlm.text.sft.batches   fine-tuning's validation: held-out conversations, scored on the replies only

The dtype rule is the caller's and is named, never implied: "float32" (what `gradlm eval` uses: the
reference figure) or "bfloat16" (autocast, what training computes in where the hardware multiplies
bf16 natively). The logits are cast to float32 before the cross-entropy either way. For the same model,
windows and dtype, every command gets the same figure (tests/test_scoring.py checks the three agree).

    >>> s = score(model, spaced_windows(tokens, 256, 65536, 32), byte_lengths, "float32")   # doctest: +SKIP
    >>> s.loss, s.bits_per_byte
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from gradlm.runtime import Runtime

# what the scorer computes in (runtime.DTYPES are the --dtype choices, "auto" among them)
SCORE_DTYPES = ("float32", "bfloat16")


def byte_bits(
    nll: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, bytes) of the scored targets: the loss in bits over targets that stand for bytes, and the
    number of those bytes. nll (nats) and targets have the same shape; targets of -1 are not scored and
    special tokens cover no bytes, so neither counts."""
    nbytes = byte_lengths.to(targets.device)[targets.clamp(min=0)].double() * (targets >= 0)
    return (nll.double() * (nbytes > 0)).sum() / math.log(2), nbytes.sum()


@dataclass
class Score:
    """What the scorer sums: the loss of the scored targets and their bits over the bytes they stand for."""

    nll: float  # summed cross-entropy, nats
    tokens: int  # targets scored
    bits: float  # nll in bits over the targets that stand for bytes
    bytes: int
    per_token: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (tokens,) float64, with keep

    @property
    def loss(self) -> float:
        """Mean cross-entropy per scored target (nats); NaN when nothing was scored."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")


@torch.no_grad()
def score(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    dtype: str = "float32",
    keep: bool = False,
    distributed: bool = False,
    on_window: Callable[[int], None] | None = None,
) -> Score:
    """Sum the loss and bits per byte of model over windows of (x, y), y = -1 where nothing is scored.

    dtype: "float32" or "bfloat16" (see the module docstring). keep: also return each scored target's
    loss, in the order of the windows (row by row). distributed: sum over the ranks of the process group
    (each rank passes its own windows). on_window(rows) is called after each window (progress bars).
    The model is scored in eval mode and left in the mode it was in."""
    device = next(model.parameters()).device
    if dtype not in SCORE_DTYPES:
        raise ValueError(f"dtype must be one of {SCORE_DTYPES}, got {dtype!r}")
    rt = Runtime(str(device), dtype)  # autocast for bfloat16, nothing for float32
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, targets, bits on bytes, bytes
    kept: list[torch.Tensor] = []
    try:
        for x, y in windows:
            x, y = rt.to_device(x, y)
            with rt.autocast():
                nll = model(x, y, reduction="none").double()  # (B, T), 0 where y is -1
            scored = y >= 0
            bits, nbytes = byte_bits(nll, y, byte_lengths)
            sums += torch.stack([nll.sum(), scored.sum().double(), bits, nbytes])
            if keep:
                kept.append(nll[scored].cpu())
            if on_window is not None:
                on_window(len(x))
    finally:
        model.train(was_training)
    if distributed:
        dist.all_reduce(sums)
    nll_sum, tokens, bits, nbytes = sums.tolist()
    per_token = (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.float64)) if keep else None
    return Score(nll_sum, int(tokens), bits, int(nbytes), per_token)


# ---- the windows each command scores -----------------------------------------------------------------------


def spaced_windows(
    tokens: np.ndarray, block: int, max_tokens: int, batch: int, rank: int = 0, world: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to max_tokens of tokens in non-overlapping windows of block, evenly spaced over all of them
    (every window when max_tokens covers them), batch windows at a time; rank takes every world-th window.
    Training's validation: a fixed sample, the same at every evaluation, so the curve compares like with like."""
    n_windows = (len(tokens) - 1) // block
    if n_windows < 1:
        return
    take = max(1, min(n_windows, max_tokens // block))
    starts = (np.linspace(0, n_windows - 1, take).round().astype(np.int64) * block)[rank::world]
    for i in range(0, len(starts), batch):
        rows = np.stack([np.asarray(tokens[s : s + block + 1], dtype=np.int64) for s in starts[i : i + batch]])
        t = torch.from_numpy(rows)
        yield t[:, :-1], t[:, 1:]


def window_plan(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence seq[0..n_targets] whose targets seq[1..n_targets] are each scored once.

    Returns (begin, end, first) per window: inputs seq[begin:end], targets seq[begin+1:end+1], of which
    positions first..end are scored. Every window but a lone short one holds exactly `window` inputs.
    """
    if n_targets < 1:
        return []
    end = min(window, n_targets)
    plan = [(0, end, 1)]
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        plan.append((new_end - window, new_end, end + 1))
        end = new_end
    return plan


def sliding_windows(
    seq: torch.Tensor, window: int, stride: int, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of `window` tokens moving `stride` at a time over seq (1-D ids), batch at a time: each scores
    only the targets no earlier window scored (window_plan), so every token but the first is scored once.
    stride = window gives non-overlapping windows (cheapest), stride 1 the full context for every token."""
    plan = window_plan(len(seq) - 1, window, stride)
    for i in range(0, len(plan), batch):
        group = plan[i : i + batch]
        x = torch.stack([seq[b:e] for b, e, _ in group])  # (B, window)
        y = torch.stack([seq[b + 1 : e + 1] for b, e, _ in group])
        for row, (b, _, first) in enumerate(group):
            y[row, : first - b - 1] = -1  # already scored by an earlier window
        yield x, y
