"""The comparison lab: several configurations (optimizers, batch modes, learning rates, ...) trained under one
budget from the same initialisation, their losses drawn against step, tokens and time (gradlm compare)."""

from __future__ import annotations

import dataclasses
import itertools
import os


from gradlm import files as ckpt
from gradlm import layout
from gradlm import plots
from gradlm.errors import ConfigError, Diverged, GradlmError, flag
from gradlm.model.transformer import ModelConfig
from gradlm.rundir import RunDir, read_metrics
from gradlm.training.config import TrainConfig
from gradlm.training.trainer import train


# ---- comparison lab ----------------------------------------------------------------------------------

GRID_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_grid(spec: dict[str, str]) -> list[dict]:
    """{"optimizer": "sgd,adamw", "lr": "1e-3,1e-2"} -> the product of the values, typed like TrainConfig."""
    axes = []
    for name, values in spec.items():
        if name not in GRID_FIELDS:
            raise ConfigError(f"cannot compare over {name!r}: it is not a training setting")
        kind = type(GRID_FIELDS[name].default)
        parsed = []
        for v in str(values).split(","):
            v = v.strip()
            try:
                parsed.append(kind(v) if kind is not bool else v.lower() in ("1", "true", "yes"))
            except ValueError:
                raise ConfigError(f"{flag(name)} value {v!r} is not a {kind.__name__}") from None
        axes.append([(name, p) for p in parsed])
    return [dict(combo) for combo in itertools.product(*axes)]


def _label(settings: dict, grid: list[dict]) -> str:
    """Name a run by the settings that differ across the grid (all of them if none do)."""
    varying = [k for k in settings if len({g[k] for g in grid}) > 1] or list(settings)
    return ",".join(f"{k}={settings[k]}" for k in varying) or "base"


def compare(model_cfg: ModelConfig, base: TrainConfig, grid: list[dict], out_dir: str | os.PathLike, log=print) -> dict:
    """Train every configuration in grid (each a dict of TrainConfig overrides) under base's budget,
    from the same seed (same initial weights, same data order), into out_dir/<label>/.
    Writes compare.png, compare.json and compare.md; returns the table rows."""
    out = ckpt.check_output(out_dir, "--out", is_dir=True)
    if (out / layout.COMPARE).exists():
        raise ConfigError(f"{out} already holds a comparison; choose another --out")
    if not (base.max_steps or base.max_tokens or base.max_time or base.max_epochs):
        raise ConfigError(
            "give the comparison one budget for every run: --max-steps, --max-tokens, --max-time or --max-epochs"
        )
    runs = []
    for settings in grid:  # every configuration is checked before any of them trains
        label = _label(settings, grid)
        # One model for every configuration: the flags' shape (--size auto would size each run on its own probe)
        cfg = dataclasses.replace(
            base,
            **settings,
            out=str(out / label.replace("=", "-").replace(",", "_")),
            progress=False,
            resume=False,
            size="fixed",
        )
        try:
            cfg.validate()
            model_cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
        runs.append((label, settings, cfg))
    table, curves = [], {}
    for label, settings, cfg in runs:
        log(f"--- {label}")
        table.append(_train_row(model_cfg, label, settings, cfg, log))
        if RunDir(cfg.out).metrics.is_file():
            curves[label] = read_metrics(cfg.out)
    if all(r["status"] == "error" for r in table):
        raise ConfigError("no run could start: " + "; ".join(f"{r['label']}: {r['error']}" for r in table))
    png = plots.plot_compare(curves, out / "compare.png", title=_budget(base))
    ckpt.atomic_write_json(out / layout.COMPARE, {"budget": _budget(base), "runs": table})
    ckpt.atomic_write_text(out / "compare.md", format_table(table))
    return {"runs": table, "png": str(png)}


def _train_row(model_cfg: ModelConfig, label: str, settings: dict, cfg: TrainConfig, log) -> dict:
    """Train one configuration of the comparison; its row of the table, whether it finished, diverged or failed."""
    row = {"label": label, **settings}
    try:
        s = train(model_cfg, cfg)
        row.update(
            steps=s["steps"],
            tokens=s["tokens"],
            time_s=round(s["time_s"], 1),
            val_loss=s["val_loss"],
            val_bpb=s["val_bpb"],
            best_val_loss=s["best_val_loss"],
            restarts=s["divergence_restarts"],
            status="ok",
        )
        warning = rank_warning(s["steps"], cfg.warmup_steps)
        if warning:
            row["warning"] = warning
            log(f"warning: {label}: {warning}")
    except Diverged as e:
        row.update(status="diverged", error=str(e))
    except GradlmError as e:  # not a property of gradient descent: a setting or input that cannot work
        row.update(status="error", error=str(e))
        log(f"error: {label}: {e}")
    return row


MIN_STEPS_TO_RANK = 50  # fewer updates than this say more about the start than about the method


def rank_warning(steps: int, warmup_steps: int) -> str:
    """Why a run's final loss cannot rank it against others, or '' when it can: it ended inside its learning-rate
    warmup (it never trained at its own learning rate), or after too few steps for the loss to separate methods."""
    if steps <= warmup_steps:
        return (
            f"ended inside its warmup ({steps} of {warmup_steps} warmup steps): it never trained at its learning "
            "rate; give a larger budget or fewer --warmup-steps"
        )
    if steps < MIN_STEPS_TO_RANK:
        return f"only {steps} steps: too few to rank (at least {MIN_STEPS_TO_RANK}); give a larger budget"
    return ""


def _budget(cfg: TrainConfig) -> str:
    parts = [
        f"{k.replace('_', ' ')} {getattr(cfg, k)}"
        for k in ("max_steps", "max_tokens", "max_time", "max_epochs")
        if getattr(cfg, k)
    ]
    return "budget: " + ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, best final validation bits per byte first; a run that cannot be
    ranked (ended in its warmup, too few steps) says so in the last column."""
    head = (
        "| run | steps | tokens | time (s) | val loss | val bits/byte | restarts | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    # bits per byte: fair across vocabularies
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["val_bpb"])
    lines = [
        f"| {r['label']} | {r['steps']} | {r['tokens']:,} | {r['time_s']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} "
        f"| {r['restarts']} | {r.get('warning', '')} |"
        for r in ok
    ]
    lines += [f"| {r['label']} | {r['status']} | | | | | | {r.get('error', '')} |" for r in rows if r["status"] != "ok"]
    unranked = sum(1 for r in ok if r.get("warning"))
    foot = (
        f"\nwarning: {unranked} of {len(ok)} runs cannot be ranked by this table (see the note column)\n"
        if unranked
        else ""
    )
    return head + "\n".join(lines) + "\n" + foot
