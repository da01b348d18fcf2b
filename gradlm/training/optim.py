"""Optimizers and learning-rate schedules: the update rule of gradient descent, and its step size over time.

    sgd        p -= lr * g                                   plain gradient descent
    momentum   v = mu*v + g;  p -= lr * v                     heavy ball
    nesterov   v = mu*v + g;  p -= lr * (g + mu*v)            look-ahead momentum
    adamw      per-coordinate steps scaled by running RMS of g, decoupled weight decay
    muon       2-D hidden matrices: momentum, then orthogonalise the update (Newton-Schulz) so every
               direction moves the same amount; embeddings, head and norms use AdamW

Weight decay applies to matrices only (never to norm gains). Every param group carries its
"base_lr"; the trainer sets group["lr"] = base_lr * schedule factor each step, so the whole schedule
is a pure function of progress and nothing about it needs saving for an exact resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gradlm.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw", "muon")
# Each optimizer's own learning rate when --lr is left out (for muon: its AdamW part; see MUON_LR).
DEFAULT_LR = {"sgd": 0.3, "momentum": 0.05, "nesterov": 0.05, "adamw": 3e-3, "muon": 3e-3}
MUON_LR = 0.02
SCHEDULES = ("constant", "cosine", "linear", "wsd")

# Quintic Newton-Schulz coefficients chosen (Jordan et al., 2024) to push singular values towards 1 fast.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7
) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by a Newton-Schulz iteration in `dtype`.

    g may be one matrix (m, n) or a stack (k, m, n), orthogonalised independently in one batched call.
    Muon picks `dtype` with fast_matmul_dtype(): bf16 where the hardware multiplies it natively (GPUs,
    CPUs with AMX / AVX512-BF16), fp32 where bf16 is emulated and slower.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    mm_add = torch.addmm if x.dim() == 2 else torch.baddbmm  # fused out = beta*input + alpha*(m1 @ m2)
    for _ in range(steps):
        gram = x @ x.mT
        poly = mm_add(gram, gram, gram, beta=b, alpha=c)  # b*G + c*G^2
        x = mm_add(x, poly, x, beta=a)  # a*X + (b*G + c*G^2) X
    if tall:
        x = x.mT
    return x.to(g.dtype)


def fast_matmul_dtype(device_type: str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively, else float32.

    On a CPU with AMX or AVX512-BF16, bf16 Newton-Schulz runs 1.3-2.7x faster than fp32 (measured in
    docs/benchmarks.md); without them bf16 is emulated and slower. Decided from the CPU's features,
    not by timing, so every process and every resume of a run makes the same choice.
    """
    if device_type == "cuda":
        return torch.bfloat16
    native = any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )
    return torch.bfloat16 if native else torch.float32


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised updates, for 2-D weight matrices only.

    The update of a (rows x cols) matrix is scaled by sqrt(max(1, rows/cols)) so that its RMS does not
    depend on the matrix's aspect ratio. Matrices of the same shape are orthogonalised as one batch.
    """

    def __init__(
        self,
        params,
        lr=0.02,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.0,
        ns_steps=5,
        ns_dtype: torch.dtype | None = None,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        )
        device = next((p.device.type for g in self.param_groups for p in g["params"]), "cpu")
        self.ns_dtype = ns_dtype or fast_matmul_dtype(device)  # None: whichever is faster here

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mu = group["momentum"]
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError("Muon updates 2-D matrices only")
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad)
                g = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, g))
            for (rows, cols), items in by_shape.items():
                updates = orthogonalize(torch.stack([g for _, g in items]), group["ns_steps"], self.ns_dtype)
                scale = max(1.0, rows / cols) ** 0.5
                for (p, _), u in zip(items, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-group["lr"] * scale)


class Combined:
    """Several optimizers stepped as one (Muon for matrices + AdamW for the rest)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers.values() for g in o.param_groups]
        self.defaults = {}
        self.state = {}

    def step(self, closure=None):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def _groups(named_params, weight_decay: float, lr: float) -> list[dict]:
    """Matrices decay, vectors (norm gains) never do. label names the lr a group follows in logs."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay, base_lr=lr, lr=lr, decay=True, label="lr")]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, base_lr=lr, lr=lr, decay=False, label="lr"))
    return groups


def muon_updates(name: str, p: torch.Tensor) -> bool:
    """Whether Muon updates this parameter: hidden 2-D matrices; everything that maps to or from tokens,
    and all vectors, go to its AdamW part."""
    return p.dim() == 2 and not name.startswith(("embed_tokens", "lm_head"))


def state_floats(model: nn.Module, name: str, trainable_only: bool = True) -> int:
    """Numbers of optimizer state that build_optimizer(model, name) keeps: per weight, none for sgd, one
    momentum for momentum/nesterov, two moments for adamw; muon keeps one for its matrices and two for
    the rest. trainable_only=False counts it as if every parameter trained (full fine-tuning)."""
    slots = {"sgd": 0, "momentum": 1, "nesterov": 1, "adamw": 2}
    seen, total = set(), 0
    for n, p in model.named_parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel() * ((1 if muon_updates(n, p) else 2) if name == "muon" else slots[name])
    return total


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 0.0,
    weight_decay: float = 0.1,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_lr: float = MUON_LR,
    muon_impl: str = "gradlm",
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer for `model`, with weight decay on matrices only and base_lr on every group.
    lr 0 means the optimizer's default (DEFAULT_LR). fused: AdamW's single-kernel update (CUDA and CPU)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = lr or DEFAULT_LR[name]
    seen, named = set(), []
    for n, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    if name in ("sgd", "momentum", "nesterov"):
        mu = 0.0 if name == "sgd" else momentum
        return torch.optim.SGD(_groups(named, weight_decay, lr), lr=lr, momentum=mu, nesterov=name == "nesterov")
    if name == "adamw":  # fused: one kernel for every parameter's update
        return torch.optim.AdamW(_groups(named, weight_decay, lr), lr=lr, betas=betas, eps=eps, fused=fused or None)
    hidden = [(n, p) for n, p in named if muon_updates(n, p)]
    hidden_ids = {id(p) for _, p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    if muon_impl == "torch":  # the shipped implementation (bf16 Newton-Schulz), kept for benchmarks
        muon = torch.optim.Muon([p for _, p in hidden], lr=muon_lr, weight_decay=weight_decay, momentum=0.95)
    else:
        muon = Muon([p for _, p in hidden], lr=muon_lr, weight_decay=weight_decay)
    for g in muon.param_groups:
        g.update(base_lr=muon_lr, decay=True, label="lr_muon")
    adamw = torch.optim.AdamW(_groups(rest, weight_decay, lr), lr=lr, betas=betas, eps=eps, fused=fused or None)
    return Combined({"muon": muon, "adamw": adamw})


def lr_factor(
    progress: float,
    step: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    warm_from: float = 0.0,
) -> float:
    """Multiplier on the base learning rate.

    progress is the fraction of the budget spent (steps, tokens, time or epochs), in [0, 1]; warmup
    ramps linearly from warm_from to what the schedule gives over the first warmup_steps steps.
      constant  1
      cosine    from 1 down to min_lr_ratio along half a cosine
      linear    from 1 down to min_lr_ratio in a straight line
      wsd       warmup-stable-decay: 1 until the last decay_fraction of the budget, then linear to min
    warm_from is 0 for a run's schedule; a run extended on resume starts a new phase that warms up again
    from the factor it had reached (step and progress counted from the phase start), so the learning rate
    climbs back to the peak without a jump and then decays over the new budget.
    """
    p = min(max(progress, 0.0), 1.0)
    lo = min_lr_ratio
    if schedule == "constant":
        f = 1.0
    elif schedule == "cosine":
        f = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    elif schedule == "linear":
        f = lo + (1 - lo) * (1 - p)
    elif schedule == "wsd":
        start = 1 - decay_fraction
        f = 1.0 if p <= start else lo + (1 - lo) * (1 - (p - start) / max(decay_fraction, 1e-12))
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        f = warm_from + (f - warm_from) * (step + 1) / warmup_steps
    return f


def set_lr(opt: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """Apply a schedule factor to every group; returns the learning rates by label, as logged:
    {"lr": ...} (the --lr part), plus {"lr_muon": ...} for Muon's matrices."""
    out = {}
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
        out.setdefault(g.get("label", "lr"), g["lr"])
    return out


def base_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The peak learning rates by label (after any guard halvings or resume overrides)."""
    out = {}
    for g in opt.param_groups:
        out.setdefault(g.get("label", "lr"), g["base_lr"])
    return out


def override_hyperparams(opt: torch.optim.Optimizer, **given) -> None:
    """Apply optimizer settings to existing param groups (a resumed optimizer keeps its moments).

    given may hold lr, muon_lr, weight_decay, momentum, beta1, beta2; each goes to the groups it means:
    lr to the groups labelled "lr", muon_lr to Muon's, weight decay to decaying groups, momentum to
    SGD's, betas to AdamW's."""
    for g in opt.param_groups:
        label = g.get("label", "lr")
        if "lr" in given and label == "lr":
            g["base_lr"] = given["lr"]
        if "muon_lr" in given and label == "lr_muon":
            g["base_lr"] = given["muon_lr"]
        if "weight_decay" in given and g.get("decay", g["weight_decay"] > 0):
            g["weight_decay"] = given["weight_decay"]
        if "momentum" in given and label == "lr" and g.get("momentum", 0) > 0:  # SGD with momentum
            g["momentum"] = given["momentum"]
        if "betas" in g and ("beta1" in given or "beta2" in given):
            g["betas"] = (given.get("beta1", g["betas"][0]), given.get("beta2", g["betas"][1]))


def scale_base_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Permanently scale every group's base lr (the divergence guard halves it)."""
    for g in opt.param_groups:
        g["base_lr"] *= factor
