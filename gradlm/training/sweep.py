"""gradlm sweep: a hyperparameter search on Optuna, every trial a normal run directory.

    gradlm sweep --data notes.txt --out sweeps/notes --trials 16 --max-time 30s \\
        --search lr=1e-4..3e-2:log batch=8,16,32 optimizer=adamw,muon d-model=128..384:64

The search space comes from --search (any training or model setting: a list, a range, a log range, a stepped
range); every other flag is fixed for every trial, and --size auto (the default) still chooses what neither
fixes. Each trial trains in OUT/trial-NNNN under the same budget; its objective is the final validation bits per
byte (fair across vocabularies; `--objective val_loss` ranks by loss). Optuna's sampler (TPE by default; random,
grid) proposes the settings; a pruner (median by default; hyperband; none) stops trials that are behind the
others at the same share of the budget.

The study lives in an Optuna storage: OUT/study.db (SQLite) by default, or any storage URL (PostgreSQL, MySQL),
so several processes or machines can work on one study. Running the same command again continues the study: a
trial whose process died (kill -9, a crash of the machine) is marked failed and the sweep goes on until the
study holds --trials finished trials. At the end (and after every trial): OUT/trials.md (the table), OUT/sweep.json,
OUT/best_config.json (the best trial's settings, for `gradlm train --config`), and the plots: history.png,
importance.png (which settings mattered, by PED-ANOVA) and sensitivity.png (the objective against each setting,
and a heat map over the learning rate and the batch size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from gradlm import files as ckpt
from gradlm.training.config import TrainConfig, given_fields
from gradlm.errors import ConfigError, Diverged, GradlmError, Interrupted
from gradlm.training.compare import rank_warning
from gradlm.model.transformer import ModelConfig

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("val_bpb", "val_loss")
STUDY_FILE = "study.db"
# Settings that say where and how a trial runs, not how it learns: never searched.
NOT_SEARCHED = {
    "data",
    "out",
    "resume",
    "from_best",
    "pause_at",
    "init",
    "progress",
    "plots",
    "logger",
    "device",
    "compile",
    "max_steps",
    "max_time",
    "max_tokens",
    "max_epochs",
    "text_field",
    "encoding_errors",
    "log_every",
    "sample_prompt",
}
PER_TRIAL = ("out", "resume", "from_best", "pause_at")  # left out of best_config.json: it says how to learn, not where


@dataclass
class Param:
    """One axis of the search space: a list of choices, or a range of numbers (log-spaced, or stepped)."""

    name: str  # the field's name (d_model)
    section: str  # "model" or "train"
    kind: type  # int, float, str or bool: the field's type
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value) -> bool:
        """Whether the search could propose this value."""
        if self.choices is not None:
            return str(value) in map(str, self.choices)
        if not self.low <= float(value) <= self.high:
            return False
        return (
            self.step is None
            or abs((float(value) - self.low) / self.step - round((float(value) - self.low) / self.step)) < 1e-9
        )

    def grid(self) -> list:
        """The values a grid search visits (lists, and stepped ranges)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ConfigError(
                f"--search-sampler grid visits listed values: {self.name}={self.low}..{self.high} is a continuous "
                "range; "
                f"give values ({self.name}=a,b,c) or a step ({self.name}={self.low}..{self.high}:STEP)"
            )
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [self.kind(self.low + i * self.step) for i in range(n)]


# vocab_size is both: searched, it is the tokenizer's size (the training setting), which sets the model's.
FIELDS = {f.name: ("model", f) for f in dataclasses.fields(ModelConfig)} | {
    f.name: ("train", f) for f in dataclasses.fields(TrainConfig)
}
NUMERIC_STRINGS = {"batch": int}  # a string setting whose values may also be a range of numbers (--batch N | full)


def parse_space(items: list[str]) -> list[Param]:
    """--search NAME=SPEC ... -> the space. SPEC: a,b,c (a list) | lo..hi (a range) | lo..hi:log | lo..hi:STEP."""
    if not items:
        raise ConfigError(
            "give the search space: --search NAME=SPEC ..., e.g. --search lr=1e-4..3e-2:log batch=8,16,32 "
            "optimizer=adamw,muon"
        )
    space: dict[str, Param] = {}
    for item in items:
        name, eq, spec = item.partition("=")
        key = name.strip().lstrip("-").replace("-", "_")
        if not eq or not spec.strip():
            raise ConfigError(
                f"--search {item!r}: write NAME=SPEC, e.g. lr=1e-4..3e-2:log, batch=8,16,32 or d-model=128..384:64"
            )
        if key not in FIELDS or key in NOT_SEARCHED:
            near = (
                " (it says where or how long a trial runs, the same for every trial: pass it as a flag)"
                if key in NOT_SEARCHED
                else ""
            )
            raise ConfigError(
                f"--search {name}: not a training or model setting that can be searched{near}; the settings are "
                "`gradlm train`'s flags"
            )
        if key in space:
            raise ConfigError(f"--search {name} is given twice")
        section, f = FIELDS[key]
        space[key] = _param(key, section, f, spec.strip())
    return list(space.values())


def _param(key: str, section: str, f: dataclasses.Field, spec: str) -> Param:
    flag = key.replace("_", "-")
    kind = type(f.default)
    if ".." not in spec:  # a list of values
        values = [v.strip() for v in spec.split(",")]
        if any(not v for v in values):
            raise ConfigError(f"--search {flag}={spec}: an empty value in the list")
        typed = [_typed(flag, v, kind) for v in values]
        if len(set(map(str, typed))) < len(typed):
            raise ConfigError(f"--search {flag}={spec}: a value is listed twice")
        return Param(key, section, kind, choices=typed)
    number = NUMERIC_STRINGS.get(key, kind)
    if number not in (int, float):
        raise ConfigError(f"--search {flag}={spec}: {flag} takes values, not a range; list them, e.g. {flag}=a,b")
    rng, _, option = spec.partition(":")
    lo_text, _, hi_text = rng.partition("..")
    low, high = (_typed(flag, v.strip(), float) for v in (lo_text, hi_text))
    if number is int and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(
            f"--search {flag}={spec}: {flag} is a whole number; give a range of whole numbers, e.g. {flag}=8..64"
        )
    if not low < high:
        raise ConfigError(f"--search {flag}={spec}: the range is empty (its low end must be below its high end)")
    log, step = False, None
    if option == "log":
        log = True
        if low <= 0:
            raise ConfigError(
                f"--search {flag}={spec}: a log range must be above 0 (log of {low:g} is undefined); start it at a "
                "small positive value"
            )
    elif option:
        step = _typed(flag, option, float)
        if not step > 0 or step > high - low:
            raise ConfigError(f"--search {flag}={spec}: the step must be above 0 and at most the width of the range")
        if number is int and not float(step).is_integer():
            raise ConfigError(f"--search {flag}={spec}: {flag} is a whole number; its step must be one too")
    return Param(key, section, int if number is int else float, low=low, high=high, log=log, step=step)


def _typed(flag: str, text: str, kind: type):
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            x = float(text)
            if not x.is_integer():
                raise ValueError
            return int(x)
        return kind(text)
    except ValueError:
        raise ConfigError(f"--search {flag}: {text!r} is not a {kind.__name__}") from None


def trial_configs(
    model_cfg: ModelConfig, cfg: TrainConfig, space: list[Param], values: dict, out: Path
) -> tuple[ModelConfig, TrainConfig]:
    """The configurations of one trial: the fixed flags, with the searched values put in."""
    train = {
        p.name: (str(values[p.name]) if p.name in NUMERIC_STRINGS else values[p.name])
        for p in space
        if p.section == "train"
    }
    model = {p.name: values[p.name] for p in space if p.section == "model"}
    return dataclasses.replace(model_cfg, **model), dataclasses.replace(
        cfg, **train, out=str(out), progress=False, resume=False
    )


def check_space(model_cfg: ModelConfig, cfg: TrainConfig, space: list[Param]) -> None:
    """Every value a trial could get must make a valid configuration: each listed value and both ends of each
    range, checked now (one line naming the setting), not when the trial draws it."""
    for p in space:
        for v in p.choices if p.choices is not None else [p.kind(p.low), p.kind(p.high)]:
            try:
                m, t = trial_configs(model_cfg, cfg, [p], {p.name: v}, Path(cfg.out))
                m.validate()
                t.validate()
                if p.name in ("n_head", "n_kv_head", "d_model") and m.d_model % m.n_head:
                    raise ConfigError(f"--d-model {m.d_model} is not a multiple of --n-head {m.n_head}")
            except ConfigError as e:
                raise ConfigError(f"--search {p.name.replace('_', '-')}: the value {v} cannot train ({e})") from None


# ---- the study


def open_study(storage: str, name: str, sampler: str, pruner: str, space: list[Param], seed: int):
    """The study in storage (created, or loaded to continue), with its sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the heartbeat: experimental since Optuna 2.9
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if sampler == "grid":
        s = optuna.samplers.GridSampler({p.name: p.grid() for p in space}, seed=seed)
    elif sampler == "random":
        s = optuna.samplers.RandomSampler(seed=seed)
    else:
        s = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max(3, len(space) + 1)))
    # Trials report at the share of the budget spent (percent), so runs with different steps per second compare.
    p = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=30),
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=10, max_resource=100, reduction_factor=3),
        "none": optuna.pruners.NopPruner(),
    }[pruner]
    for attempt in range(3):  # two workers starting together race to create the storage's tables: the loser tries again
        try:
            with _creating(storage):
                if storage.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
                    # a heartbeat lets any worker mark the trial of a worker that died as failed
                    store = optuna.storages.RDBStorage(
                        storage,
                        heartbeat_interval=15,
                        grace_period=60,
                        engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite:") else {},
                    )
                else:
                    store = storage
                return optuna.create_study(
                    study_name=name, storage=store, sampler=s, pruner=p, direction="minimize", load_if_exists=True
                )
        except Exception as e:
            if attempt < 2 and any(race in str(e) for race in ("already exists", "UNIQUE constraint", "duplicate key")):
                time.sleep(0.5 + random.random())
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"--storage {storage}: cannot open it as an Optuna storage ({first}); give a URL such as "
                f"sqlite:///sweep.db or postgresql://user:password@host/db"
            ) from None


@contextlib.contextmanager
def _creating(storage: str):
    """Workers of one machine open a local SQLite study one at a time (creating its tables is not safe to race)."""
    if not storage.startswith("sqlite:///"):
        yield
        return
    lock = Path(storage[len("sqlite:///") :] + ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fail_dead_trials(study) -> list[int]:
    """Trials left running by a process of this machine that no longer exists (kill -9): failed, now (a worker on
    another machine is failed by the storage's heartbeat once it has been silent for its grace period). Returns
    their numbers."""
    import optuna

    host, dead = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("pid", 0))):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            dead.append(t.number)
    optuna.storages.fail_stale_trials(study)
    return dead


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted(study) -> int:
    """Trials that count towards --trials: finished (complete, pruned, or failed by their own settings, such as a
    divergence), and running in other workers. A trial whose process died does not count: it is tried again."""
    import optuna

    S = optuna.trial.TrialState
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in (S.COMPLETE, S.PRUNED, S.RUNNING)
        or t.state == S.FAIL
        and t.user_attrs.get("status") in ("diverged", "error")
    )


def sweep(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    space: list[Param],
    out: str | os.PathLike,
    trials: int = 20,
    given: set[str] | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    storage: str = "",
    study_name: str = "",
    objective: str = "val_bpb",
    log=print,
) -> dict:
    """Search space for the trials' best objective; returns {"best": ..., "trials": [...], "plots": [...]}.
    given: the settings the caller typed, fixed in every trial (--size auto chooses the rest); None, as for train():
    the settings that differ from their defaults. Trial 0 is the default: the values `gradlm train` with the same
    settings would use for the searched ones, when they lie in the space (not with a grid)."""
    _check_sweep(cfg, trials, sampler, pruner, objective)
    out = ckpt.check_output(out, "--out", is_dir=True)
    if given is None:  # as train(): the settings that differ from their defaults
        given = given_fields(cfg, None) | given_fields(model_cfg, None)
    cfg.validate()
    model_cfg.validate()
    check_space(model_cfg, cfg, space)
    # a range without a step fails here
    target = min(trials, math.prod(len(p.grid()) for p in space)) if sampler == "grid" else trials
    study, storage = _open_in(out, storage, study_name, sampler, pruner, space, cfg.seed)
    dead = fail_dead_trials(study)
    if dead:
        log(f"trials {', '.join(map(str, dead))} died with the process that ran them: marked failed; the sweep goes on")
    done = counted(study)
    log(f"sweep {study.study_name}: {done} of {target} trials done, storage {storage}; each trial {budget_text(cfg)}")
    if not study.trials and sampler != "grid":  # the first trial: what `gradlm train` with the same flags would do
        _enqueue_default(study, model_cfg, cfg, space, given, out, log)
    objective_fn = _objective(model_cfg, cfg, space, out, objective, set(given) | {p.name for p in space}, log)
    while counted(study) < target:
        study.optimize(objective_fn, n_trials=1, catch=(TrialFailed,))
        write_results(study, out, objective, cfg, space)
    return write_results(study, out, objective, cfg, space, plots=True)


def _check_sweep(cfg: TrainConfig, trials: int, sampler: str, pruner: str, objective: str) -> None:
    """The sweep's own settings, checked before anything is written."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"--search-sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time or cfg.max_epochs):
        raise ConfigError(
            "give every trial one budget: --max-time (e.g. 30s), --max-steps, --max-tokens or --max-epochs"
        )


def _open_in(
    out: Path, storage: str, study_name: str, sampler: str, pruner: str, space: list[Param], seed: int
) -> tuple:
    """(study, storage URL): the study of --storage, or by default of a SQLite file in out. A folder made here
    for a study that then fails to open is removed again."""
    default, made = not storage, not out.exists()
    storage = storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"
    if default:
        out.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(storage, study_name or out.resolve().name, sampler, pruner, space, seed)
    except ConfigError:
        if default and made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if study.trials:  # a study continued: the sampler draws anew (a seeded random search would repeat its first trials)
        study.sampler.reseed_rng()
    out.mkdir(parents=True, exist_ok=True)
    return study, storage


def _enqueue_default(
    study, model_cfg: ModelConfig, cfg: TrainConfig, space: list[Param], given: set[str], out: Path, log
) -> None:
    """Trial 0: the values `gradlm train` with the same flags would use, when they lie in the space."""
    values = default_values(model_cfg, cfg, space, set(given), out)
    if values is not None and all(p.contains(values[p.name]) for p in space):
        study.enqueue_trial(values, user_attrs={"default": True})
        log(
            "trial 0 is the default, what `gradlm train` with these flags would use: "
            + ", ".join(f"{k}={_show(v)}" for k, v in values.items())
        )
    elif values is not None:
        log(
            "the default ("
            + ", ".join(f"{k}={_show(v)}" for k, v in values.items())
            + ") lies outside the space: it is not one of the trials"
        )


def _objective(
    model_cfg: ModelConfig, cfg: TrainConfig, space: list[Param], out: Path, objective: str, given: set[str], log
):
    """Optuna's objective: train one trial in out/trial-NNNN and return its objective; it reports the objective
    at each evaluation (at the percent of the budget spent) so the pruner can stop it early."""
    import optuna

    def objective_fn(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        values = {p.name: p.suggest(trial) for p in space}
        run = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run))
        m, t = trial_configs(model_cfg, cfg, space, values, run)
        log(f"--- trial {trial.number}: " + ", ".join(f"{k}={_show(v)}" for k, v in values.items()))
        reported = [0]

        def on_eval(step: int, progress: float, ev: dict) -> bool:
            at = int(100 * progress)
            if at > reported[0]:  # one report per percent of the budget
                reported[0] = at
                trial.report(ev[objective], at)
            return trial.should_prune()

        from gradlm.training.trainer import train

        try:
            s = train(m, t, given=given, on_eval=on_eval)
        # Ctrl-C: the trial is failed (and tried again by the next run of the sweep), the sweep stops
        except Interrupted:
            raise
        # the trial's own settings failed it (a divergence, a shape that cannot train): it counts
        except GradlmError as e:
            trial.set_user_attr("status", "diverged" if isinstance(e, Diverged) else "error")
            trial.set_user_attr("error", str(e))
            log(f"trial {trial.number}: {e}")
            raise TrialFailed(str(e)) from None
        for k in ("steps", "tokens", "val_loss", "val_bpb", "best_val_loss", "stop"):
            trial.set_user_attr(k, s[k])
        trial.set_user_attr("time_s", round(s["time_s"], 1))
        if s["stop"] == "pruned":
            trial.set_user_attr("warning", f"pruned at {reported[0]}% of its budget")
            log(f"trial {trial.number}: pruned at {reported[0]}% of its budget ({objective} {s[objective]:.4f})")
            raise optuna.TrialPruned()
        warning = rank_warning(s["steps"], _warmup(run))
        if warning:
            trial.set_user_attr("warning", warning)
        log(f"trial {trial.number}: {objective} {s[objective]:.4f} ({s['steps']} steps)")
        return s[objective]

    return objective_fn


class TrialFailed(Exception):
    """A trial that its own settings failed: Optuna records it as failed and the sweep goes on."""


def default_values(
    model_cfg: ModelConfig, cfg: TrainConfig, space: list[Param], given: set[str], out: Path
) -> dict | None:
    """The value of each searched setting that `gradlm train` with the same flags would use: --size auto's choice
    (measured by its probe, as the trials will be) or the flag's default. Builds the run's trainer without training
    it (nothing is written but the data cache the trials share); None if it cannot be built."""
    from gradlm.training.trainer import Trainer

    try:
        t = Trainer(
            model_cfg,
            dataclasses.replace(cfg, out=str(out / "default-probe"), progress=False),
            log=lambda m: None,
            given=given,
        ).build()
    except GradlmError:
        return None
    try:
        values = {}
        for p in space:
            v = getattr(t.cfg if p.section == "train" else t.model_cfg, p.name)
            values[p.name] = (str(v) if p.choices is not None else int(v)) if p.name in NUMERIC_STRINGS else v
        return values
    finally:
        t.close_run_dir()


def _warmup(run: Path) -> int:
    try:
        return int(json.loads((run / "config.json").read_text())["train"]["warmup_steps"])
    except (OSError, ValueError, KeyError):
        return 0


def _show(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def budget_text(cfg: TrainConfig) -> str:
    parts = [
        f"{k.replace('max_', '').replace('_', ' ')} {getattr(cfg, k)}"
        for k in ("max_time", "max_steps", "max_tokens", "max_epochs")
        if getattr(cfg, k)
    ]
    return "budget: " + ", ".join(parts)


# ---- results


def rows(study, objective: str) -> list[dict]:
    """The trials as table rows, best first; unfinished and failed ones last."""
    import optuna

    S = optuna.trial.TrialState
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        state = {
            S.COMPLETE: "ok",
            S.PRUNED: "pruned",
            S.FAIL: a.get("status", "died"),
            S.RUNNING: "running",
            S.WAITING: "waiting",
        }.get(t.state, str(t.state))
        note = a.get("warning") or a.get("error", "")
        if a.get("default"):
            note = "the default (gradlm train's own choice)" + (f"; {note}" if note else "")
        out.append(
            {
                "trial": t.number,
                "state": state,
                objective: a.get(objective),
                "val_loss": a.get("val_loss"),
                "val_bpb": a.get("val_bpb"),
                "steps": a.get("steps"),
                "time_s": a.get("time_s"),
                "params": dict(t.params),
                "run": a.get("run", ""),
                "note": note,
                "unranked": state == "ok" and bool(a.get("warning")),
            }
        )
    order = {"ok": 0, "pruned": 1}
    return sorted(
        out,
        key=lambda r: (order.get(r["state"], 2), r[objective] if r[objective] is not None else math.inf, r["trial"]),
    )


def format_trials(table: list[dict], objective: str) -> str:
    names = sorted({k for r in table for k in r["params"]})
    other = "val_bpb" if objective == "val_loss" else "val_loss"  # the other measure, beside the objective
    head = f"| trial | state | {objective} | {other} | steps | time (s) | " + " | ".join(names) + " | note |\n"
    head += "|---:|---|---:|---:|---:|---:|" + "---|" * len(names) + "---|\n"

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else ""

    lines = [
        f"| {r['trial']} | {r['state']} | {num(r[objective], '.4f')} | {num(r[other], '.4f')} | "
        f"{num(r['steps'], 'd')} | {num(r['time_s'], '')} | "
        + " | ".join(_show(r["params"][n]) if n in r["params"] else "" for n in names)
        + f" | {r['note']} |"
        for r in table
    ]
    ok = [r for r in table if r["state"] == "ok"]
    short = sum(1 for r in ok if r["unranked"])
    foot = (
        f"\nwarning: {short} of {len(ok)} finished trials cannot be ranked by this table (too short: see the note "
        "column); give a larger budget\n"
        if short
        else ""
    )
    return head + "\n".join(lines) + "\n" + foot


def write_results(study, out: Path, objective: str, cfg: TrainConfig, space: list[Param], plots: bool = False) -> dict:
    """trials.md, sweep.json and best_config.json (after every trial); the plots (at the end)."""
    import optuna

    table = rows(study, objective)
    ckpt.atomic_write_text(out / "trials.md", format_trials(table, objective))
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    if done:
        b = min(done, key=lambda t: t.value)
        best = {
            "trial": b.number,
            objective: b.value,
            "params": b.params,
            "run": b.user_attrs.get("run", ""),
            "config": str(out / "best_config.json"),
        }
        write_best_config(Path(best["run"]), out / "best_config.json")
    result = {
        "study": study.study_name,
        "objective": objective,
        "budget": budget_text(cfg),
        "best": best,
        "trials": table,
        "plots": [],
    }
    if plots and done:
        result["plots"], result["importance"] = draw(study, table, space, objective, out)
    ckpt.atomic_write_json(out / "sweep.json", result)
    return result


def write_best_config(run: Path, path: Path) -> None:
    """The best trial's config.json as a --config file: its settings, not its place (out, resume) or its
    auto-sizing (size: fixed, since the shape it chose is in the file)."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    train = {k: v for k, v in config.get("train", {}).items() if k not in PER_TRIAL}
    train["size"] = "fixed"
    ckpt.atomic_write_json(path, {"model": config.get("model", {}), "train": train})


def importances(study) -> tuple[dict[str, float], str]:
    """Each searched setting's importance, normalised to sum to 1, or ({}, why not) when the finished trials cannot
    say. Optuna's PED-ANOVA: how far a setting's values among the best trials (the top 4, or 10% of many) lie from
    its values over all of them; it needs no model fitted to the trials (fANOVA would need scikit-learn)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 5:
        return {}, f"{len(done)} finished trials: too few to tell (at least 5)"
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 4 / len(done))))
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except (RuntimeError, ValueError) as e:  # e.g. no setting varied among the finished trials
        return {}, str(e).splitlines()[0]


def draw(study, table: list[dict], space: list[Param], objective: str, out: Path) -> tuple[list[str], dict]:
    """history.png, importance.png and sensitivity.png; returns their paths and the importances."""
    from gradlm import plots

    paths = [
        plots.plot_sweep_history(
            [
                (r["trial"], r[objective] if r["state"] == "ok" else _last_report(study, r["trial"]), r["state"])
                for r in table
            ],
            objective,
            out / "history.png",
        )
    ]
    imp, why = importances(study)
    paths.append(plots.plot_importance(imp, out / "importance.png", note=why))
    points = [(r["params"], r[objective]) for r in table if r["state"] == "ok" and r[objective] is not None]
    names = [p.name for p in space]
    ranked = sorted(names, key=lambda n: -imp.get(n, 0.0))
    pair = ("lr", "batch") if {"lr", "batch"} <= set(names) else (tuple(ranked[:2]) if len(ranked) >= 2 else None)
    paths.append(plots.plot_sensitivity(points, space, objective, out / "sensitivity.png", pair=pair))
    return [str(p) for p in paths], imp


def _last_report(study, number: int) -> float | None:
    values = study.trials[number].intermediate_values
    return values[max(values)] if values else None
