"""Experiments on gradient descent itself: the learning-rate range test and the comparison lab.

lr_find  trains from the usual initialisation while the learning rate grows exponentially each step,
         and reads a good learning rate off the loss curve (where the loss falls fastest).
compare  trains several configurations (optimizers, batch modes, learning rates, ...) under one
         budget from the same initialisation, and draws their losses against step, tokens and time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path

import sys

import numpy as np
from tqdm.auto import tqdm

from gradlm import files as ckpt
from gradlm import layout
from gradlm import plots
from gradlm.errors import ConfigError, GradlmError
from gradlm.model.transformer import ModelConfig
from gradlm.training.optim import set_lr
from gradlm.rundir import Metrics
from gradlm.training.config import TrainConfig
from gradlm.training.trackers import Trackers, parse_loggers
from gradlm.training.trainer import Trainer


def lr_find(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    start_lr: float = 1e-6,
    end_lr: float = 10.0,
    steps: int = 100,
    png: str | os.PathLike | None = None,
    log=print,
    out: str | os.PathLike | None = None,
) -> dict:
    """Learning-rate range test. Returns {"suggested_lr", "reason", "lrs", "losses", ...}; with png, draws
    the loss against the learning rate there. Shows a progress bar on a terminal (cfg.progress), a log line
    every tenth of the sweep otherwise.

    With out (a folder), the sweep is recorded there as it runs, for `gradlm watch`: a row per step in
    lr_find.jsonl ({"step", "lr", "loss", "smoothed"}), then lr_find.json (the result). A sweep that fails
    leaves no record behind.

    The suggestion is the learning rate where the smoothed loss falls fastest per decade of learning
    rate: large enough to make quick progress, well below the point where the loss turns back up.
    """
    _check_range(start_lr, end_lr, steps, png)
    loggers = parse_loggers(cfg.logger)
    check_logged_out(cfg, out)
    record, trackers = None, None
    if out:
        out, made, record = _start_record(out)
    try:
        if loggers:  # every row of lr_find.jsonl (step, lr, loss, smoothed) also goes to the trackers
            settings = {
                "lr_find": {"start_lr": start_lr, "end_lr": end_lr, "steps": steps},
                "model": dataclasses.asdict(model_cfg),
                "train": dataclasses.asdict(cfg),
            }
            trackers = Trackers(loggers, out, settings, log=log)
            record.listener = trackers.metrics_row
        result = _sweep(model_cfg, cfg, start_lr, end_lr, steps, log, record)
        if png:
            result["png"] = str(
                plots.plot_lr_find(result["lrs"], result["losses"], result["smoothed"], result["suggested_lr"], png)
            )
        if out:
            ckpt.atomic_write_json(out / LR_FIND_RESULT, result)
        if trackers is not None:
            trackers.images(len(result["lrs"]), [Path(result["png"])] if png else [])
            trackers.close(ok=True)
    except BaseException:
        if trackers is not None:
            trackers.close(ok=False)
        if record is not None:  # no half-written record
            record.path.unlink(missing_ok=True)
            if made:
                shutil.rmtree(out, ignore_errors=True)
        raise
    return result


LR_FIND_ROWS, LR_FIND_RESULT = layout.LR_FIND_ROWS, layout.LR_FIND_RESULT


def _check_range(start_lr: float, end_lr: float, steps: int, png) -> None:
    """ConfigError for a range or a step count that cannot give a usable curve, or a --png that cannot be written."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the range test needs 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}")
    if steps < 10:
        raise ConfigError(f"--steps must be at least 10 for a usable curve, got {steps}")
    if png:
        ckpt.check_output(png, "--png")  # before the sweep, not after it


def _start_record(out: str | os.PathLike) -> tuple[Path, bool, Metrics]:
    """The --out folder (made here if it was not there: whether it was), with the sweep's lr_find.jsonl in it."""
    out = ckpt.check_output(out, "--out", is_dir=True)
    if (out / LR_FIND_RESULT).exists() or (out / LR_FIND_ROWS).exists():
        raise ConfigError(f"{out} already holds a learning-rate sweep; choose another --out")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return out, made, Metrics(out / LR_FIND_ROWS)


def check_logged_out(cfg: TrainConfig, out) -> None:
    """--logger records a sweep in its --out folder (TensorBoard's files, the trackers' ids): one must be given."""
    if cfg.logger and not out:
        raise ConfigError(
            f"--logger {cfg.logger} records the sweep in its --out folder (TensorBoard's files, the trackers' ids): "
            "add --out DIR"
        )


def _sweep(model_cfg: ModelConfig, cfg: TrainConfig, start_lr: float, end_lr: float, steps: int, log, record) -> dict:
    """The sweep itself (see lr_find), and the suggestion _read_curve reads off it."""
    cfg = copy.deepcopy(cfg)
    cfg.lr = cfg.lr or 1.0
    cfg.size = "fixed"  # the range test is for the model the flags describe
    with tempfile.TemporaryDirectory() as tmp:  # the trainer never writes here: no run directory is made
        cfg.out = str(Path(tmp) / "lr-find")
        t = Trainer(model_cfg, cfg, log=log).build()
        t.model.train()
        lrs, losses, smoothed = [], [], []
        best = float("inf")
        bar = tqdm(
            total=steps,
            desc="lr-find",
            disable=not (cfg.progress and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            set_lr(t.opt, lr / cfg.lr)
            loss, _ = t.gradients()
            if not math.isfinite(loss):
                break
            t.update()
            lrs.append(lr)
            losses.append(loss)
            smoothed = plots.smooth(losses, 0.9)
            best = min(best, smoothed[-1])
            if record is not None:
                record.write(step=i + 1, lr=lr, loss=loss, smoothed=smoothed[-1])
            bar.update()
            bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed[-1]:.3f}")
            if bar.disable and cfg.progress and (i + 1) % max(steps // 10, 1) == 0:
                log(f"lr-find: step {i + 1}/{steps} | lr {lr:.2e} | loss {loss:.4f} (smoothed {smoothed[-1]:.4f})")
            if i > 10 and smoothed[-1] > 4 * best:  # clearly diverging: the rest of the range tells nothing
                log(f"lr-find: the loss diverged at lr {lr:.2e} (step {i + 1}); the rest of the range tells nothing")
                break
        bar.close()
    if len(lrs) < 5:
        raise GradlmError(f"the loss diverged within {len(lrs)} steps from lr {start_lr:g}; lower --start-lr")
    return {**_read_curve(lrs, losses), "optimizer": cfg.optimizer}


def _read_curve(lrs: list[float], losses: list[float]) -> dict:
    """The suggestion read off a sweep's losses (see lr_find), with the curve it was read from."""
    # Analyse a centred moving average: the online EMA lags ~10 steps, which on an exponential sweep
    # would shift every reading towards larger learning rates.
    k = max(1, len(losses) // 25)
    s = np.convolve(np.pad(np.array(losses), k, mode="edge"), np.ones(2 * k + 1) / (2 * k + 1), mode="valid")
    smoothed = s.tolist()
    x = np.log10(np.array(lrs))
    lowest = int(s.argmin())
    slope = np.gradient(s, x)  # change in loss per decade of learning rate
    # Only look left of the minimum, skipping the first steps where the smoothing is still settling.
    lo = min(len(s) // 10, max(lowest - 1, 0))
    window = slope[lo : max(lowest, lo + 1)]
    steepest = lo + int(window.argmin())
    suggested = float(lrs[steepest])
    reason = (
        f"the loss falls fastest at lr {suggested:.2g} ({slope[steepest]:.2f} nats per decade), is lowest at lr "
        f"{lrs[lowest]:.2g} "
        f"and {'turns up after it' if lowest < len(lrs) - 1 else 'was still falling at the end of the range'}: "
        f"start at the fastest-falling point; learning rates near {lrs[lowest]:.2g} are already too large for a whole "
        "run"
    )
    return {
        "suggested_lr": suggested,
        "min_loss_lr": float(lrs[lowest]),
        "reason": reason,
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
    }
