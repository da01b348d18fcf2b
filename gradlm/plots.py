"""PNG plots of training: one run's curves, several runs side by side, and the LR range test.

matplotlib is imported lazily with the non-interactive Agg backend, so importing gradlm stays cheap
and plotting works on machines without a display.
"""

from __future__ import annotations

import os
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (so the first points are not pulled toward 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _save(fig, path: str | os.PathLike) -> Path:
    from gradlm.checkpoint import _atomic

    path = Path(path)
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    _plt().close(fig)
    return path


def step_rows(rows: list[dict]) -> list[dict]:
    """The rows of metrics.jsonl that log a training step (not an evaluation, not an event such as a guard
    restore, which also names a loss)."""
    return [r for r in rows if "grad_norm" in r and "event" not in r]


def plot_runs(runs: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (train, smoothed, and validation), learning rate and gradient norm against step.

    runs maps a label to that run's metrics rows (as in metrics.jsonl)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, (label, rows) in enumerate(runs.items()):
        color = f"C{k % 10}"
        train = step_rows(rows)
        val = [r for r in rows if "val_loss" in r]
        if train:
            axes[0].plot([r["step"] for r in train], smooth([r["loss"] for r in train], 0.6), color=color, label=f"{label} train")
            axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color=color, label=label)
            muon = [r for r in train if "lr_muon" in r]
            if muon:  # Muon's matrices follow their own learning rate (--muon-lr)
                axes[1].plot([r["step"] for r in muon], [r["lr_muon"] for r in muon], "--", color=color, label=f"{label} (muon matrices)")
            axes[2].plot([r["step"] for r in train], [r["grad_norm"] for r in train], color=color, label=label, alpha=0.8)
        if val:
            axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=3, label=f"{label} val")
        for r in rows:
            if r.get("event") == "diverged":
                axes[0].axvline(r["at_step"], color=color, ls=":", alpha=0.6)
    axes[0].set(title="loss (cross-entropy, nats/token)", xlabel="step")
    axes[1].set(title="learning rate", xlabel="step", yscale="log")
    axes[2].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_compare(runs: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss (smoothed) and validation loss of several runs vs step, vs tokens and vs wall time."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for k, (label, rows) in enumerate(runs.items()):
        color = f"C{k % 10}"
        train = step_rows(rows)
        val = [r for r in rows if "val_loss" in r]
        for ax, key in zip(axes, ("step", "tokens", "time")):
            if train:  # a run with few logged steps (batch GD) gets markers, or its curve would not show
                ax.plot([r[key] for r in train], smooth([r["loss"] for r in train], 0.6), color=color, label=label, marker="s" if len(train) < 5 else None)
            if val:
                ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o", color=color, ms=3)
    for ax, name in zip(axes, ("step", "tokens seen", "wall time (s)")):
        ax.set(xlabel=name)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="loss (lines: train, smoothed; dots: validation)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "gradient descent, compared")
    return _save(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, path: str | os.PathLike) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="C0", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="loss (smoothed)")
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested lr {suggestion:.2g}")
    ax.set(xscale="log", xlabel="learning rate (grows exponentially each step)", ylabel="training loss", title="learning-rate range test")
    lo, hi = min(min(losses), min(smoothed)), smoothed[0]
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
