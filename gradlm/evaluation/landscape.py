"""The loss surface around a trained model: what gradient descent walked on.

    gradlm landscape runs/demo                  # RUN/landscape/: landscape.json and four pictures
    gradlm landscape runs/demo --plane path     # the plane of the path training took (train with --snapshots N)

Three views, each the validation loss at weights near the trained ones theta*:
  1-D slice      L(theta* + a d1) for a in [-span, span]
  2-D slice      L(theta* + a d1 + b d2) on a grid: a contour map and a surface
  the line       L((1 - t) theta0 + t theta*) from the initial weights theta0 (t = 0) to the trained ones (t = 1)
                 and a little beyond (Goodfellow, Vinyals and Saxe, 2015)

The directions d1, d2 are random and normalised per filter (Li, Xu, Taylor, Studer and Goldstein, 2018,
"Visualizing the Loss Landscape of Neural Nets"): each row of each weight matrix of d (one output unit, a
"filter") is scaled to the norm of the same row of theta*, so a step of 1 moves every unit by its own size
and the scale invariance of normalised networks does not distort the picture; the norms' gains (1-D) are
left where they are. With --plane init, d1 is the line from theta* back to theta0 (a = 1 is the initial
weights) and d2 a random filter-normalised direction orthogonal to it: the plane holds where training started.

The path training took, when the run recorded it (gradlm train --snapshots N: the weights at N points of its
budget in RUN/snapshots/), is the initial weights, the snapshots and the final weights. With --plane path the
plane is the path's own (Li et al., section 7): d1, d2 are the first two principal components of the points
minus theta*, the unit vectors whose plane through theta* is closest to them in least squares (the top right
singular vectors of the n_points x n_params matrix, computed from its n x n Gram matrix; not centred, as
sklearn's PCA in Li et al.'s code is, because the plane must pass through theta*, the centre of the picture).
These directions are NOT filter-normalised: a step of 1 is a step of norm 1 in weight space, and the grid spans
the path's projection with a margin (--span scales it). The share of the path's variance (its squared distance
from theta*) that the plane holds is reported; it is 1 when the path has at most two points besides theta*.
With any plane, a recorded path is projected onto it (least squares on the two directions, which need not be
orthogonal) and drawn on the contour map, with each point's loss and the loss at its projection.

The initial weights are rebuilt exactly as training made them (the run's seed; the --init run's weights for
a run that started from another), so every run has its line without having saved anything.

Every loss is the one scorer's (gradlm/model/scoring.py) on the same windows, in the dtype the run's validation
used (--dtype): by default the run's own validation windows (--eval-tokens of evenly spaced windows of its
validation split), so the centre of the slices is the run's final validation loss.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradlm import files
from gradlm.errors import ConfigError, RunDirError
from gradlm.model.scoring import SCORE_DTYPES, score, spaced_windows
from gradlm.model.transformer import Transformer
from gradlm.rundir import RunDir, weights_step
from gradlm.text.data import find_prepared

PLANES = ("random", "init", "path")
PATH_MARGIN = 1.25  # --plane path: the grid reaches this times the path's farthest point along each direction


@dataclass
class LandscapeConfig:
    """How the surface is sampled (the flags of `gradlm landscape`)."""

    grid: int = field(default=21, metadata={"help": "points per axis of the 2-D slice (and of the 1-D slice)"})
    span: float = field(
        default=1.0,
        metadata={
            "help": "each slice covers [-span, span] along its directions; --plane path: span x the path's reach "
            "along each, plus a quarter"
        },
    )
    batches: int = field(
        default=0, metadata={"help": "batches of validation windows each loss averages (0 = all the run's windows)"}
    )
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    plane: str = field(
        default="random",
        metadata={
            "help": "random (two random directions), init (the line to the initial weights + one random) or path "
            "(the first two principal components of the path training recorded with --snapshots)"
        },
    )
    line_points: int = field(
        default=25, metadata={"help": "points on the line from the initial to the trained weights (0 = no line)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random directions"})
    dtype: str = field(
        default="auto",
        metadata={"help": "float32, bfloat16 (autocast), or auto: what the run's validation computed in"},
    )

    def validate(self) -> None:
        problems = []
        if self.grid < 3:
            problems.append(f"--grid must be at least 3, got {self.grid}")
        if not (self.span > 0 and math.isfinite(self.span)):
            problems.append(f"--span must be a positive number, got {self.span}")
        if self.batches < 0:
            problems.append(f"--batches must not be negative, got {self.batches}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.plane not in PLANES:
            problems.append(f"--plane must be one of {', '.join(PLANES)}, got {self.plane!r}")
        if self.line_points < 0 or self.line_points == 1:
            problems.append(f"--line-points must be 0 (no line) or at least 2, got {self.line_points}")
        if self.dtype not in ("auto", *SCORE_DTYPES):
            problems.append(f"--dtype must be auto, {', '.join(SCORE_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ConfigError("; ".join(problems))


# ---- directions and weights --------------------------------------------------------------------------------


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of the model's parameters (tied ones once)."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def filter_normalized(weights: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction with each row of each matrix scaled to the norm of that row of weights (Li et al.,
    2018); vectors (the norms' gains) get no component."""
    out = {}
    for name, w in weights.items():
        if w.dim() < 2:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        rows_w, rows_d = w.reshape(len(w), -1).norm(dim=1), d.reshape(len(d), -1).norm(dim=1)
        out[name] = d * (rows_w / rows_d.clamp_min(1e-12)).view(-1, *[1] * (w.dim() - 1))
    return out


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def orthogonal_to(d: dict[str, torch.Tensor], u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d without its component along u, rescaled to d's norm (so its size per filter stays comparable)."""
    norm_d = math.sqrt(_dot(d, d))
    along = _dot(d, u) / _dot(u, u)
    out = {k: d[k] - along * u[k] for k in d}
    scale = norm_d / max(math.sqrt(_dot(out, out)), 1e-12)
    return {k: v * scale for k, v in out.items()}


def set_weights(
    model: torch.nn.Module, base: dict[str, torch.Tensor], moves: list[tuple[float, dict[str, torch.Tensor]]]
) -> None:
    """model's parameters := base + sum of coefficient * direction."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = base[name].clone()
            for c, d in moves:
                if c:
                    w.add_(d[name], alpha=c)
            p.copy_(w)


def initial_weights(run: RunDir) -> dict[str, torch.Tensor]:
    """The weights training started from: a new model as the trainer makes it from the run's seed, or the
    weights of the run it was initialised from (--init, and fine-tuning's base run)."""
    cfg = run.read_config()
    train = cfg.get("train", {})
    model = Transformer(run.model_config())
    if train.get("init"):
        init = RunDir(train["init"])
        if not init.exists():
            raise RunDirError(
                f"{run.path} started from {train['init']}, which is gone: its initial weights are unknown"
            )
        init.load_weights_into(model)
    else:
        torch.manual_seed(train.get("seed", 0))  # as the trainer does before it makes the model
        model.reset_parameters(seed=train.get("seed", 0))
    return weights_of(model)


# ---- the path training took (--snapshots) ---------------------------------------------------------------------


def recorded_path(
    run: RunDir, model: torch.nn.Module, theta, theta0, steps: list[int], loss: Callable[[], float], tick=lambda: None
) -> list[dict]:
    """The path a run recorded, in order: the initial weights theta0, the snapshots of these steps and the final
    weights, each {"name", "step", "loss", "diff"}: its validation loss and its weights minus theta (the centre).
    model is left at theta."""
    points = []

    def add(name: str, step: int) -> None:
        w = weights_of(model)
        points.append({"name": name, "step": step, "loss": loss(), "diff": {k: w[k] - theta[k] for k in theta}})
        tick()

    try:
        set_weights(model, theta0, [])
        add("initial", 0)
        for step in steps:
            run.load_snapshot_into(model, step)
            add(f"step {step}", step)
        add("final", run.load_weights_into(model))
    finally:
        set_weights(model, theta, [])
    return points


def path_directions(diffs: list[dict[str, torch.Tensor]], gen: torch.Generator) -> tuple[dict, dict]:
    """The first two principal components of a path (diffs: its points minus theta*), not centred: the unit
    directions of the plane through theta* closest to the points, from the eigenvectors of their Gram matrix
    (the right singular vectors of the points' matrix). Each is signed so the first point (the initial weights)
    lies on its positive side. A path along one line has no second: d2 is then a random unit direction
    orthogonal to d1."""
    n = len(diffs)
    gram = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = _dot(diffs[i], diffs[j])
    values, vectors = np.linalg.eigh(gram)
    values, vectors = values[::-1], vectors[:, ::-1]  # the largest first
    if not values[0] > 0:
        raise ConfigError("the recorded path does not move: every point of it equals the weights at the centre")
    dirs = []
    for k in range(min(2, n)):
        if values[k] <= 1e-12 * values[0]:
            break
        c = vectors[:, k] / math.sqrt(values[k])
        d = {name: sum(float(c[i]) * diffs[i][name].double() for i in range(n)).float() for name in diffs[0]}
        sign = -1.0 if _dot(d, diffs[0]) < 0 else 1.0
        dirs.append({name: sign * v for name, v in d.items()})
    if len(dirs) < 2:
        d2 = orthogonal_to({k: torch.randn(v.shape, generator=gen) for k, v in dirs[0].items()}, dirs[0])
        norm = math.sqrt(_dot(d2, d2))
        dirs.append({k: v / norm for k, v in d2.items()})
    return dirs[0], dirs[1]


def project_path(diffs: list[dict[str, torch.Tensor]], d1, d2) -> tuple[np.ndarray, list[float], float]:
    """The least-squares coordinates (a, b) of each displacement on the plane of d1 and d2 (any two independent
    directions: the 2 x 2 normal equations), each one's share of its length off the plane, and the share of the
    path's variance (its squared distance from theta*) that the plane holds."""
    g = np.array([[_dot(d1, d1), _dot(d1, d2)], [_dot(d1, d2), _dot(d2, d2)]])
    coords, off, held, total = [], [], 0.0, 0.0
    for diff in diffs:
        r = np.array([_dot(d1, diff), _dot(d2, diff)])
        c = np.linalg.solve(g, r)
        norm2, inside = _dot(diff, diff), float(c @ r)
        coords.append(c)
        off.append(math.sqrt(max(norm2 - inside, 0.0) / norm2) if norm2 > 0 else 0.0)
        held, total = held + inside, total + norm2
    return np.asarray(coords), off, min(held / total, 1.0) if total > 0 else 1.0


# ---- the loss --------------------------------------------------------------------------------------------------


def run_windows(run: RunDir, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's validation windows: its --eval-tokens of evenly spaced windows of its validation split, as
    training scored them (read from the cache of prepared text, offline)."""
    cfg = run.read_config()
    data, train = cfg.get("data", {}), cfg.get("train", {})
    if data.get("format") == "chat":
        raise ConfigError(
            f"{run.path} was fine-tuned on conversations; pass --data FILE (text) to score the surface on"
        )
    found = find_prepared(data.get("identity", ""), data.get("path", "")) if data.get("identity") else None
    if found is None:
        raise RunDirError(
            f"the tokens {run.path} trained on are not in the cache any more; pass --data FILE (text) to score on"
        )
    block = run.model_config().block_size
    return list(spaced_windows(found.tokens("val"), block, train.get("eval_tokens", 32768), batch_size))


def text_windows(tokens: list[int], block: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of a text (its token ids), evenly spaced as validation takes them."""
    if len(tokens) < block + 1:
        raise ConfigError(
            f"the text has {len(tokens)} tokens, fewer than the context window + 1 ({block + 1}); give more"
        )
    return list(spaced_windows(np.asarray(tokens, dtype=np.int64), block, len(tokens), batch_size))


def loss_fn(
    model: torch.nn.Module, windows: list, byte_lengths: torch.Tensor, dtype: str = "float32"
) -> Callable[[], float]:
    """The mean validation loss of model's current weights on windows (the one scorer, in dtype)."""
    return lambda: score(model, windows, byte_lengths, dtype).loss


# ---- the slices ------------------------------------------------------------------------------------------------


def slice_1d(model, base, d, alphas: np.ndarray, loss: Callable[[], float], tick=lambda: None) -> np.ndarray:
    out = []
    for a in alphas:
        set_weights(model, base, [(float(a), d)])
        out.append(loss())
        tick()
    return np.asarray(out)


def slice_2d(
    model, base, d1, d2, alphas: np.ndarray, betas: np.ndarray, loss: Callable[[], float], tick=lambda: None
) -> np.ndarray:
    """losses[j, i] = L(base + alphas[i] d1 + betas[j] d2) (rows along d2, as contour plots read them)."""
    out = np.zeros((len(betas), len(alphas)))
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            set_weights(model, base, [(float(a), d1), (float(b), d2)])
            out[j, i] = loss()
            tick()
    return out


def interpolate(model, start, end, ts: np.ndarray, loss: Callable[[], float], tick=lambda: None) -> np.ndarray:
    """L((1 - t) start + t end) for each t."""
    step = {k: end[k] - start[k] for k in end}
    out = []
    for t in ts:
        set_weights(model, start, [(float(t), step)])
        out.append(loss())
        tick()
    return np.asarray(out)


def curvature(alphas: np.ndarray, losses: np.ndarray, within: float | None = None) -> float:
    """The second derivative at 0 of a 1-D slice, from a least-squares parabola through its points (those within
    |a| <= within, if given and at least 3): how sharp the minimum is along that direction (nan: too few points)."""
    finite = np.isfinite(losses)
    keep = finite & (np.abs(alphas) <= (within if within is not None else np.inf))
    if keep.sum() < 3:  # too few points near 0: fit them all
        keep = finite
    if keep.sum() < 3:
        return float("nan")
    a2, _, _ = np.polyfit(alphas[keep], losses[keep], 2)
    return float(2 * a2)


# ---- the command -----------------------------------------------------------------------------------------------


def landscape(
    run_dir: str | os.PathLike,
    cfg: LandscapeConfig | None = None,
    out: str | os.PathLike | None = None,
    text: str | None = None,
    best: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> dict:
    """Sample the loss surface around a run's weights; write landscape.json (and the pictures) in out
    (default RUN/landscape) and return what it holds: the axes, the losses, the centre's loss, the
    curvature along d1, the recorded path (if the run has snapshots) and the time it took. text: score on this
    text instead of the run's validation windows.

        >>> r = landscape("runs/demo", LandscapeConfig(grid=11))   # doctest: +SKIP
        >>> r["center_loss"], r["curvature_d1"]
    """
    cfg = cfg or LandscapeConfig()
    cfg.validate()
    run = RunDir(run_dir)
    if not run.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no config.json); train one first")
    final_step = weights_step(run.checkpoint_path()) if run.checkpoint_path().is_file() else -1
    # a snapshot past the checkpoint is of steps an interrupted run has not kept (its resume takes them again)
    steps = [s for s in run.list_snapshots() if final_step < 0 or s < final_step]
    if cfg.plane == "path" and not steps:
        raise ConfigError(
            f"--plane path draws the path training took, and {run.path} recorded none (no snapshots/); train with "
            "--snapshots N (e.g. --snapshots 10) to record it"
        )
    out = Path(out) if out is not None else run.path / "landscape"
    files.check_output(out, "landscape folder", is_dir=True)
    t0 = time.time()
    model, tok = run.load_model(best)
    windows = (
        text_windows(tok.encode(text), model.cfg.block_size, cfg.batch_size)
        if text is not None
        else run_windows(run, cfg.batch_size)
    )
    if cfg.batches:
        windows = windows[: cfg.batches]
    dtype = cfg.dtype if cfg.dtype != "auto" else run.read_config().get("runtime", {}).get("dtype", "float32")
    if dtype not in SCORE_DTYPES:
        dtype = "float32"
    loss = loss_fn(model, windows, torch.tensor(tok.token_byte_lengths(), dtype=torch.long), dtype)
    theta = weights_of(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    d1, d2 = filter_normalized(theta, gen), filter_normalized(theta, gen)
    theta0 = initial_weights(run) if cfg.line_points or cfg.plane == "init" or steps else None
    ts = np.linspace(-0.25, 1.25, cfg.line_points) if cfg.line_points else np.zeros(0)
    n_path = len(steps) + 2 if steps else 0  # the initial weights, the snapshots, the final weights
    total = cfg.grid + cfg.grid * cfg.grid + len(ts) + 2 * n_path
    bar = tqdm(total=total, desc="landscape", unit="loss", disable=not progress, leave=False)
    try:
        center = loss()
        path = recorded_path(run, model, theta, theta0, steps, loss, bar.update) if steps else []
        if cfg.plane == "init":
            d1 = {k: theta0[k] - theta[k] for k in theta}  # a = 1: the initial weights
            d2 = orthogonal_to(d2, d1)
        elif cfg.plane == "path":
            d1, d2 = path_directions([p["diff"] for p in path], gen)
        coords, off, explained = project_path([p.pop("diff") for p in path], d1, d2) if path else (None, [], None)
        axis = axis_b = np.linspace(-cfg.span, cfg.span, cfg.grid)
        if cfg.plane == "path":  # the path's projection, and a margin
            reach = np.abs(coords).max(axis=0) * PATH_MARGIN * cfg.span
            axis = np.linspace(-reach[0], reach[0], cfg.grid)
            axis_b = np.linspace(-max(reach[1], 0.1 * reach[0]), max(reach[1], 0.1 * reach[0]), cfg.grid)
        for i, p in enumerate(path):  # each point's projection, and the loss there
            a, b = float(coords[i, 0]), float(coords[i, 1])
            set_weights(model, theta, [(a, d1), (b, d2)])
            p.update(a=a, b=b, off_plane=off[i], plane_loss=loss())
            bar.update()
        one = slice_1d(model, theta, d1, axis, loss, bar.update)
        two = slice_2d(model, theta, d1, d2, axis, axis_b, loss, bar.update)
        line = interpolate(model, theta0, theta, ts, loss, bar.update) if len(ts) else np.zeros(0)
    finally:
        bar.close()
        set_weights(model, theta, [])
    result = {
        "run": str(run.path),
        "weights": "best" if best else "final",
        "config": asdict(cfg),
        "dtype": dtype,
        "windows": len(windows),
        "tokens": int(sum(y.numel() for _, y in windows)),
        "center_loss": center,
        "axis": axis.tolist(),
        "axis_b": axis_b.tolist(),
        "slice_1d": one.tolist(),
        "slice_2d": two.tolist(),
        "line_t": ts.tolist(),
        "line": line.tolist(),
        "curvature_d1": curvature(axis, one, within=float(axis[-1]) / 2),
        "path": path,  # with snapshots: name, step, loss, a, b, off_plane (share of its length), plane_loss
        "path_explained": explained,  # the share of the path's variance the plane holds
        "seconds": round(time.time() - t0, 2),
    }
    files.atomic_write_dir(out, lambda tmp: _write(tmp, result, plots))
    return result


def _write(folder: Path, result: dict, plots: bool) -> None:
    (folder / "landscape.json").write_text(files.dumps(result, indent=1) + "\n", encoding="utf-8")
    if plots:
        from gradlm.plots import plot_landscape

        plot_landscape(result, folder)
