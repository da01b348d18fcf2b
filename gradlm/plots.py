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
    from gradlm.files import _atomic

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
            axes[0].plot(
                [r["step"] for r in train], smooth([r["loss"] for r in train], 0.6), color=color, label=f"{label} train"
            )
            axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color=color, label=label)
            muon = [r for r in train if "lr_muon" in r]
            if muon:  # Muon's matrices follow their own learning rate (--muon-lr)
                axes[1].plot(
                    [r["step"] for r in muon],
                    [r["lr_muon"] for r in muon],
                    "--",
                    color=color,
                    label=f"{label} (muon matrices)",
                )
            axes[2].plot(
                [r["step"] for r in train], [r["grad_norm"] for r in train], color=color, label=label, alpha=0.8
            )
        if val:
            axes[0].plot(
                [r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=3, label=f"{label} val"
            )
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
                ax.plot(
                    [r[key] for r in train],
                    smooth([r["loss"] for r in train], 0.6),
                    color=color,
                    label=label,
                    marker="s" if len(train) < 5 else None,
                )
            if val:
                ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o", color=color, ms=3)
    for ax, name in zip(axes, ("step", "tokens seen", "wall time (s)")):
        ax.set(xlabel=name)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="loss (lines: train, smoothed; dots: validation)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "gradient descent, compared")
    return _save(fig, path)


def plot_lr_find(
    lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, path: str | os.PathLike
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="C0", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="loss (smoothed)")
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested lr {suggestion:.2g}")
    ax.set(
        xscale="log",
        xlabel="learning rate (grows exponentially each step)",
        ylabel="training loss",
        title="learning-rate range test",
    )
    lo, hi = min(min(losses), min(smoothed)), smoothed[0]
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


# ---- gradlm sweep


def plot_sweep_history(trials: list[tuple[int, float | None, str]], objective: str, path: str | os.PathLike) -> Path:
    """Each trial's objective in the order they ran (pruned ones at their last report, as x), and the best so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    done = [(n, v) for n, v, s in trials if s == "ok" and v is not None]
    pruned = [(n, v) for n, v, s in trials if s == "pruned" and v is not None]
    if done:
        ax.plot(*zip(*done), "o", color="C0", label="trial")
        best, line = float("inf"), []
        for n, v in sorted(done):
            best = min(best, v)
            line.append((n, best))
        ax.step(*zip(*line), where="post", color="C3", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned), "x", color="C7", label="pruned (last report)")
    ax.set(xlabel="trial", ylabel=objective.replace("_", " "), title="optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_importance(importances: dict[str, float], path: str | os.PathLike, note: str = "") -> Path:
    """Each searched setting's share of the objective's variance (fANOVA), largest first."""
    plt = _plt()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(items), 2) + 1.5))
    if items:
        ax.barh([k.replace("_", "-") for k, _ in items], [v for _, v in items], color="C0")
        for k, (_, v) in enumerate(items):
            ax.text(v, k, f" {v:.2f}", va="center", fontsize=8)
    ax.set(
        xlabel="importance (Optuna's PED-ANOVA, normalised to sum to 1)",
        title="what mattered" + (f"\n{note}" if note else ""),
    )
    ax.set_xlim(0, 1.1)
    return _save(fig, path)


def plot_sensitivity(
    points: list[tuple[dict, float]],
    space: list,
    objective: str,
    path: str | os.PathLike,
    pair: tuple[str, str] | None = None,
) -> Path:
    """The objective against each searched setting (one panel each; log axes for log ranges), and a heat map of the
    best objective over two settings (pair, e.g. the learning rate and the batch size) from the trials that ran."""
    plt = _plt()
    n = len(space) + (1 if pair else 0)
    cols = min(n, 3)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(5 * cols, 3.8 * ((n + cols - 1) // cols)), squeeze=False
    )
    flat_axes = list(axes.flat)
    values = [v for _, v in points]
    for ax, p in zip(flat_axes, space):
        _sensitivity_panel(ax, p, [params[p.name] for params, _ in points], values, objective)
    if pair:
        _pair_heat_map(
            fig,
            flat_axes[len(space)],
            [_cells(next(q for q in space if q.name == name), points) for name in pair],
            values,
            objective,
        )
    for ax in flat_axes[n:]:
        ax.axis("off")
    fig.suptitle(f"sensitivity of {objective.replace('_', ' ')} to each setting ({len(points)} finished trials)")
    fig.tight_layout()
    return _save(fig, path)


def _sensitivity_panel(ax, p, xs: list, values: list[float], objective: str) -> None:
    """The objective against one setting's values: listed values evenly spaced, a log range on a log axis."""
    import numpy as np

    if p.choices is not None:
        labels = [str(c) for c in p.choices]
        ax.scatter([labels.index(str(x)) for x in xs], values, c="C0", alpha=0.7)
        ax.set_xticks(range(len(labels)), labels)
    else:
        ax.scatter(xs, values, c="C0", alpha=0.7)
        if p.log:  # a log range often spans one decade or two: four labelled ticks across it, no minor labels
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ticks = np.geomspace(p.low, p.high, 4)
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=p.name.replace("_", "-"), ylabel=objective.replace("_", " "))
    ax.grid(alpha=0.3)


def _cells(p, points: list[tuple[dict, float]]) -> tuple[str, list[str], list[int]]:
    """(name, cell labels, each trial's cell) of one axis of the heat map: a cell per listed value, or 5 bins
    of a range (log-spaced for a log range)."""
    import numpy as np

    xs = [params[p.name] for params, _ in points]
    if p.choices is not None:
        cells = [str(c) for c in p.choices]
        return p.name, cells, [cells.index(str(x)) for x in xs]
    edges = np.geomspace(p.low, p.high, 6) if p.log else np.linspace(p.low, p.high, 6)
    index = [min(int(np.searchsorted(edges, x, side="right")) - 1, 4) for x in xs]
    return p.name, [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(5)], index


def _pair_heat_map(fig, ax, axis: list[tuple[str, list[str], list[int]]], values: list[float], objective: str) -> None:
    """The best objective in each cell of two settings (blank where no trial ran), each cell labelled."""
    import numpy as np

    (xn, xc, xi), (yn, yc, yi) = axis
    grid = np.full((len(yc), len(xc)), np.nan)
    for a, b, v in zip(xi, yi, values):
        grid[b, a] = v if np.isnan(grid[b, a]) else min(grid[b, a], v)
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r")
    mid = np.nanmean(grid)
    for (b, a), v in np.ndenumerate(grid):
        if not np.isnan(v):  # dark text on the light (low) end of the colour map
            ax.text(a, b, f"{v:.3f}", ha="center", va="center", fontsize=7, color="k" if v <= mid else "w")
    ax.set_xticks(range(len(xc)), xc, rotation=30, fontsize=7)
    ax.set_yticks(range(len(yc)), yc, fontsize=7)
    ax.set(
        xlabel=xn.replace("_", "-"),
        ylabel=yn.replace("_", " "),
        title=f"best {objective.replace('_', ' ')} (blank: not tried)",
    )
    fig.colorbar(im, ax=ax)


def plot_landscape(result: dict, folder: str | os.PathLike) -> list[Path]:
    """gradlm landscape's pictures in folder: the 1-D slice, the 2-D slice as contours (with the recorded path
    projected onto the plane, if the run has one) and as a surface, and the line from the initial weights (if
    sampled). The trained weights are the centre (0, 0) of every slice."""
    import numpy as np

    plt, folder = _plt(), Path(folder)
    axis = np.asarray(result["axis"])
    axis_b = np.asarray(result.get("axis_b", axis))
    one, two = np.asarray(result["slice_1d"], dtype=float), np.asarray(result["slice_2d"], dtype=float)
    plane, path = result["config"]["plane"], result.get("path") or []
    d1, d2, scaled = {
        "init": ("toward the initial weights (a = 1)", "random direction d2", "filter-normalised"),
        "path": ("path's first principal component", "path's second principal component", "unit norm"),
    }.get(plane, ("random direction d1", "random direction d2", "filter-normalised"))
    title = f"{Path(result['run']).name}: validation loss around the {result['weights']} weights"
    if path:
        held = f"{100 * result['path_explained']:.1f}% of the path's variance"
        title += f"\n{'the two components explain' if plane == 'path' else 'the plane holds'} {held}"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(axis, one, marker=".")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set(xlabel=f"a, along the {d1} ({scaled})", ylabel="loss", title=title)
    ax.annotate(f"curvature at 0: {result['curvature_d1']:.3g}", xy=(0.02, 0.95), xycoords="axes fraction", va="top")
    paths.append(_save(fig, folder / "landscape_1d.png"))

    clipped = np.minimum(two, np.nanpercentile(two, 95))  # a few huge losses at the corners would flatten the map
    levels = np.linspace(np.nanmin(clipped), np.nanmax(clipped), 25)
    fig, ax = plt.subplots(figsize=(6, 5))
    filled = ax.contourf(axis, axis_b, clipped, levels=levels, cmap="viridis")
    ax.contour(axis, axis_b, clipped, levels=levels[::3], colors="white", linewidths=0.5)
    if path:  # projected onto the plane; a point off the grid is cut off at its edge
        pa, pb = [p["a"] for p in path], [p["b"] for p in path]
        ax.plot(pa, pb, color="white", lw=1.2, marker="o", ms=4, mfc="orange", mec="black", label="training path")
        ax.plot(pa[:1], pb[:1], "o", ms=8, mfc="none", mec="orange", mew=2, label="its start (initial weights)")
    ax.plot([0], [0], "r*", ms=12, label="trained weights")
    if plane == "init" and axis[0] <= 1 <= axis[-1] and not path:
        ax.plot([1], [0], "wo", ms=7, label="initial weights")
    ax.set_xlim(axis[0], axis[-1])
    ax.set_ylim(axis_b[0], axis_b[-1])
    ax.legend(loc="best" if path else "upper right", fontsize=8)
    fig.colorbar(filled, label="loss (clipped at its 95th percentile)")
    ax.set(xlabel=f"a ({d1})", ylabel=f"b ({d2})", title=title)
    paths.append(_save(fig, folder / "landscape_2d.png"))

    fig = plt.figure(figsize=(6.5, 5))
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(axis, axis_b)
    ax.plot_surface(a, b, clipped, cmap="viridis", linewidth=0, antialiased=True, alpha=0.85 if path else 1.0)
    inside = [p for p in path if axis[0] <= p["a"] <= axis[-1] and axis_b[0] <= p["b"] <= axis_b[-1]]
    if inside:  # the path at the loss of its projection, on the surface
        top = np.nanmax(clipped)
        zs = [min(p["plane_loss"], top) if p["plane_loss"] is not None else top for p in inside]
        ax.plot([p["a"] for p in inside], [p["b"] for p in inside], zs, color="red", marker="o", ms=3, zorder=10)
    ax.set(xlabel="a", ylabel="b", zlabel="loss", title=title)
    paths.append(_save(fig, folder / "landscape_3d.png"))

    if result["line"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(result["line_t"], result["line"], marker=".")
        for t, name in ((0, "initial"), (1, "trained")):
            ax.axvline(t, color="grey", lw=0.8, ls=":")
            ax.annotate(name, xy=(t, 0.98), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=8)
        ax.set(xlabel="t: weights (1 - t) initial + t trained", ylabel="loss", title=title)
        paths.append(_save(fig, folder / "landscape_line.png"))
    return paths


def plot_attention(
    attention: list, tokens: list[str], path: str | os.PathLike, layer: int | None = None, head: int | None = None
) -> Path:
    """Attention maps (gradlm inspect --attention): every layer x head as a grid of small maps, or one layer's heads,
    or one head large with its tokens on the axes. Row i: how much position i reads each position (columns)."""
    import numpy as np

    plt = _plt()
    a = np.asarray(attention)  # (layers, heads, T, T)
    layers = [layer] if layer is not None else list(range(a.shape[0]))
    heads = [head] if head is not None else list(range(a.shape[1]))
    big = len(layers) == 1 and len(heads) == 1
    size = 6 if big else 2.0
    fig, axes = plt.subplots(
        len(layers), len(heads), figsize=(size * len(heads) + 1, size * len(layers)), squeeze=False
    )
    for r, li in enumerate(layers):
        for c, hi in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(a[li, hi], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {li}, head {hi}", fontsize=9 if big else 7)
            if big:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle("attention: row = the position reading, column = the position read", fontsize=10)
    return _save(fig, path)
