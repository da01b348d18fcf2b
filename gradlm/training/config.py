"""Training settings: TrainConfig (saved as the "train" section of a run's config.json), budgets, and
the rules for what a resumed run takes from the command line and what it keeps from its checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from gradlm.errors import ConfigError, check_field_types, flag
from gradlm.training.optim import DEFAULT_LR, MUON_LR, OPTIMIZERS, SCHEDULES
from gradlm.text.prepare import READING, parse_size
from gradlm.text.tokenizer import DEFAULT_VOCAB, VOCAB_HELP
from gradlm.runtime import COMPILE, DEVICE_HELP, DTYPES
from gradlm.training.trackers import LOGGER_HELP, parse_loggers


DEFAULT_STEPS = 1000  # the budget of a run given none, said in the log
FULL_BATCH_MICRO = 32  # windows per forward pass of --batch full unless --micro-batch says


@dataclass
class TrainConfig:
    """How to train. Saved as the "train" section of a run's config.json."""

    data: str = field(
        default="shakespeare",
        metadata={
            "help": "raw text (file, directory, .jsonl, .gz, or a registered name such as shakespeare) or a `gradlm "
            "prepare` directory"
        },
    )
    out: str = field(default="runs/default", metadata={"help": "run directory to write"})
    vocab_size: int = field(default=DEFAULT_VOCAB, metadata={"help": "when --data is raw text: " + VOCAB_HELP})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the text held out for validation"})
    text_field: str = field(default=READING["text_field"][0], metadata={"help": READING["text_field"][1]})
    encoding_errors: str = field(
        default=READING["encoding_errors"][0], metadata={"help": READING["encoding_errors"][1]}
    )
    tokenizer_sample: str = field(
        default=READING["tokenizer_sample"][0], metadata={"help": READING["tokenizer_sample"][1]}
    )
    batch: str = field(
        default="32",
        metadata={
            "help": "windows per update: N (mini-batch), 1 (stochastic GD) or full (batch GD: one update per epoch)"
        },
    )
    micro_batch: int = field(
        default=0,
        metadata={"help": f"windows per forward pass; 0 = the whole batch (or {FULL_BATCH_MICRO} with --batch full)"},
    )
    accum: int = field(default=1, metadata={"help": "gradient accumulation: micro-batches summed into one update"})
    sampler: str = field(
        default="auto",
        metadata={
            "help": "random (windows at random offsets) or epoch (every window once per epoch, seeded order); auto = "
            "epoch for --batch full"
        },
    )
    size: str = field(
        default="auto",
        metadata={
            "help": "auto: choose depth, width, heads, context, batch, learning rate, warmup, dropout, evaluation "
            "cadence and tokenizer size from the budget, the corpus and this machine's speed (measured in a short "
            "probe); the default when no model-shape flag is given, and the flags you give override their part of "
            "the choice. fixed: each flag's own default"
        },
    )
    optimizer: str = field(default="adamw", metadata={"help": "sgd, momentum, nesterov, adamw or muon"})
    lr: float = field(
        default=0.0,
        metadata={
            "help": "peak learning rate (for muon: of its AdamW part); 0 = the optimizer's default: "
            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        },
    )
    muon_lr: float = field(default=MUON_LR, metadata={"help": "learning rate of Muon's matrix updates"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices (a regulariser)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum for --optimizer momentum/nesterov"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    schedule: str = field(
        default="cosine", metadata={"help": "learning-rate schedule: constant, cosine, linear or wsd"}
    )
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of the budget spent decaying"})
    max_steps: int = field(
        default=0,
        metadata={
            "help": f"budget: stop after this many updates (with no budget of any kind: {DEFAULT_STEPS} steps, and "
            "the log says so)"
        },
    )
    max_time: str = field(
        default="",
        metadata={
            "help": "budget: stop after this much wall time from the first step, evaluations included, e.g. 90s, 5m, 1h"
        },
    )
    max_tokens: int = field(default=0, metadata={"help": "budget: stop after this many training tokens"})
    max_epochs: float = field(
        default=0.0, metadata={"help": "budget: stop after this many passes over the training set"}
    )
    pause_at: int = field(
        default=0, metadata={"help": "save and stop at this step without ending the schedule; continue with --resume"}
    )
    eval_every: int = field(default=50, metadata={"help": "evaluate (and checkpoint) every N steps"})
    eval_tokens: int = field(default=32768, metadata={"help": "validation tokens per evaluation"})
    sample_tokens: int = field(
        default=48,
        metadata={
            "help": "at every evaluation, write a seeded sample of this many tokens from a fixed prompt to "
            "samples.jsonl: what the model writes as it learns (0 = none)"
        },
    )
    sample_prompt: str = field(
        default="",
        metadata={"help": "the fixed prompt of those samples (default: the first tokens of the validation text)"},
    )
    snapshots: int = field(
        default=0,
        metadata={
            "help": "record the path training takes: save the weights N times, evenly spaced over the budget, into "
            "RUN/snapshots/ (the final weights are the checkpoint), for `gradlm landscape RUN --plane path` (0 = off)"
        },
    )
    patience: int = field(
        default=0, metadata={"help": "early stopping: stop after N evaluations without improvement (0 = off)"}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "improvement in validation loss that counts for --patience"}
    )
    guard_retries: int = field(
        default=8,
        metadata={"help": "divergence guard: times to restore the last good state and halve the lr before giving up"},
    )
    bpe_dropout: float = field(
        default=0.0,
        metadata={
            "help": "BPE-dropout: re-split the training text (in fine-tuning: the system and user turns) with every "
            "merge skipped with this probability, e.g. 0.1, so the model learns to read words from their pieces; "
            "the loss, evaluation and the saved tokenizer stay deterministic"
        },
    )
    typo_rate: float = field(
        default=0.0,
        metadata={
            "help": "typo augmentation: give this share of the letters of the training text (in fine-tuning: the "
            "system and user turns) a typo (drop, swap, double, near key, case), e.g. 0.05; the loss stays on the "
            "clean text (a misspelled word's typo-free pieces are targets, a typo never is)"
        },
    )
    seed: int = field(default=1337, metadata={"help": "fixes initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "float32, or bfloat16 autocast (weights and optimizer state stay float32); auto = bfloat16 where "
            "the hardware multiplies it natively (CUDA from compute capability 8, CPUs with AMX or AVX512-BF16), "
            "else float32"
        },
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the training step (and on CUDA the evaluation): on, off, or auto = on when the run "
            "repays the compile at the speed-up it buys (measured on CPUs: --max-time from ~3.5 minutes in bf16, ~5.7 "
            "in float32, where a C++ compiler is on PATH; on CUDA also under a step budget); a compile auto chose "
            "that fails trains on uncompiled"
        },
    )
    log_every: int = field(default=10, metadata={"help": "log the training loss every N steps"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the run in --out from its last checkpoint; flags you type override its saved settings "
            "where they can"
        },
    )
    from_best: bool = field(
        default=False,
        metadata={"help": "with --resume: continue from the best checkpoint (best.safetensors) instead of the latest"},
    )
    init: str = field(
        default="",
        metadata={
            "help": "start from the weights (and tokenizer) of this run directory: fine-tuning / transfer learning"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar on a terminal"})
    plots: bool = field(
        default=True, metadata={"help": "draw loss, learning-rate and gradient-norm curves into plots/ at the end"}
    )
    logger: str = field(default="", metadata={"help": LOGGER_HELP + "; a resumed run keeps logging where it did"})

    def __post_init__(self):
        if isinstance(self.compile, bool):  # config.json of runs from before --compile auto
            self.compile = "on" if self.compile else "off"
        if isinstance(self.batch, int) and not isinstance(self.batch, bool):
            self.batch = str(self.batch)  # TrainConfig(batch=32) means what --batch 32 means
        if not isinstance(self.batch, str):
            raise ConfigError(
                f"TrainConfig.batch must be a number of windows or 'full', got {self.batch!r} "
                f"({type(self.batch).__name__})"
            )
        check_field_types(self)

    def validate(self) -> None:
        """Every problem of the settings at once, as one ConfigError. Long on purpose: one check per setting in
        one list, read top to bottom (pieces would only split the list)."""
        problems = []
        if self.batch != "full" and not (self.batch.isdigit() and int(self.batch) >= 1):
            problems.append(f"--batch must be a positive integer or 'full', got {self.batch!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.size not in ("auto", "fixed"):
            problems.append(f"--size must be auto or fixed, got {self.size!r}")
        if self.sampler not in ("auto", "random", "epoch"):
            problems.append(f"--sampler must be auto, random or epoch, got {self.sampler!r}")
        if self.batch == "full" and self.sampler == "random":
            problems.append("--batch full visits every window once per update, so it needs --sampler epoch (or auto)")
        for name in ("lr", "muon_lr"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)) or (name == "muon_lr" and v == 0):
                problems.append(f"{flag(name)} must be a positive number, got {v}")
        for name in ("accum", "eval_every", "eval_tokens", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_epochs"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} is a budget and must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "sample_tokens",
            "patience",
            "guard_retries",
            "micro_batch",
            "pause_at",
            "snapshots",
            "weight_decay",
            "grad_clip",
            "min_delta",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        try:
            parse_size(self.tokenizer_sample, "--tokenizer-sample")
        except ConfigError as e:
            problems.append(str(e))
        if self.encoding_errors not in ("strict", "replace", "skip"):
            problems.append(f"--encoding-errors must be strict, replace or skip, got {self.encoding_errors!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compile not in COMPILE:
            problems.append(f"--compile must be {', '.join(COMPILE)}, got {self.compile!r}")
        if not 0 <= self.bpe_dropout < 1:
            problems.append(
                "--bpe-dropout is the chance of skipping a merge and must be in [0, 1), e.g. 0.1; got "
                f"{self.bpe_dropout}"
            )
        if not 0 <= self.typo_rate < 1:
            problems.append(
                "--typo-rate is the share of letters given a typo and must be in [0, 1), e.g. 0.05; got "
                f"{self.typo_rate}"
            )
        try:
            if parse_duration(self.max_time) < 0:
                problems.append(
                    "--max-time is a budget and must be a positive duration such as 90s, 5m or 1h, got "
                    f"{self.max_time!r}"
                )
        except ConfigError as e:
            problems.append(str(e))
        try:
            parse_loggers(self.logger)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# What a resume may change, and why the rest cannot: the run's model, tokenizer, data and data order
# are fixed by its checkpoint, and changing the schedule would make the learning rate jump.
FIXED_ON_RESUME = {
    "data": "the data",
    "vocab_size": "the tokenizer",
    "val_fraction": "the data split",
    "text_field": "the data",
    "encoding_errors": "the data",
    "tokenizer_sample": "the tokenizer",
    "optimizer": "the optimizer (its state is restored)",
    "batch": "the batch geometry",
    "accum": "the batch geometry",
    "sampler": "the data order",
    "seed": "the data order and initialisation",
    "init": "the starting weights",
    "schedule": "the learning-rate schedule",
    "warmup_steps": "the learning-rate schedule",
    "min_lr_ratio": "the learning-rate schedule",
    "decay_fraction": "the learning-rate schedule",
    "size": "the model's shape",
    "bpe_dropout": "the data augmentation",
    "typo_rate": "the data augmentation",
}
BUDGETS = ("max_steps", "max_tokens", "max_time", "max_epochs")


def check_budgets(cfg: TrainConfig, given: set[str]) -> None:
    """A budget the caller gave must be positive: `--max-time 0` or `--max-steps 0` would otherwise mean
    "no limit" (and train until Ctrl-C) or "the default" by accident. Negative ones fail in validate()."""
    zero = [
        b for b in BUDGETS if b in given and not (parse_duration(cfg.max_time) if b == "max_time" else getattr(cfg, b))
    ]
    if zero:
        flags = ", ".join(f"{flag(b)} {getattr(cfg, b) if getattr(cfg, b) != '' else repr('')}" for b in zero)
        raise ConfigError(
            f"{flags}: a budget must be positive (e.g. --max-time 5m or --max-steps 2000); leave the flag out for the "
            "default "
            f"of {DEFAULT_STEPS} steps when no budget is given"
        )


OPTIMIZER_SETTINGS = ("lr", "muon_lr", "weight_decay", "momentum", "beta1", "beta2")
PER_INVOCATION = ("out", "resume", "from_best", "pause_at")  # never taken from the saved run


def given_fields(cfg, given: Iterable[str] | None) -> set[str]:
    """The fields the caller set: the CLI passes the flags typed; the Python API, given=None, means
    the fields that differ from their defaults."""
    if given is not None:
        return {f.name for f in fields(cfg)} & set(given)
    defaults = type(cfg)()
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def resume_settings(saved: TrainConfig, new: TrainConfig, given: set[str]) -> TrainConfig:
    """The settings to resume with: the run's own (saved), except those the caller gave (named in given, their
    values in new: budgets, optimizer settings, cadence, ...). One that cannot apply to a run in progress is
    refused by name."""
    for name in sorted(given & set(FIXED_ON_RESUME)):
        if getattr(new, name) != getattr(saved, name):
            raise ConfigError(
                f"{flag(name)} {getattr(new, name)} cannot change on --resume ({FIXED_ON_RESUME[name]} of the run "
                f"is {getattr(saved, name)!r}); "
                f"drop it, or start a new run from this one with --init {new.out}"
            )
    merged = {
        f.name: getattr(new if f.name in given or f.name in PER_INVOCATION else saved, f.name)
        for f in fields(TrainConfig)
    }
    return TrainConfig(**merged)


def parse_duration(text: str) -> float:
    """'90s' -> 90.0, '5m' -> 300.0, '1.5h' -> 5400.0, '' -> 0 (not set), '120' -> 120 seconds, '-1m' -> -60."""
    if not text:
        return 0.0
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
    if not m:
        raise ConfigError(f"--max-time {text!r} is not a duration; write e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m.group(2)]


# ---- config files ---------------------------------------------------------------------------------------

CONFIG_SECTIONS = ("model", "train", "finetune")


def read_config_file(path: str | os.PathLike, classes) -> dict:
    """The settings in a TOML, YAML or JSON file, as {field name: value} for the given config classes.

    Keys are field names (dashes or underscores), at the top level or in [model] / [train] / [finetune]
    sections; a file with sections reads only those, so a run's own config.json reproduces its settings.
    Unknown keys are an error listing them; values are type-checked by the dataclasses themselves.

        # settings.toml
        [train]
        optimizer = "muon"
        max-time = "5m"
        [model]
        n-layer = 6
    """
    p = Path(path)
    data = _parse_config_file(p)
    sections = [k for k in CONFIG_SECTIONS if isinstance(data.get(k), dict)]
    items: list[tuple[str, object]] = []
    for k in sections:
        items += list(data[k].items())
    if not sections:
        items = list(data.items())
    known = {f.name: f for cls in classes for f in fields(cls)}
    values, unknown = {}, []
    for key, value in items:
        name = str(key).replace("-", "_")
        if name in known:
            values[name] = _yaml_float(value, known[name])
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(
            f"--config {p}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}; the "
            "settings are the command's flags without '--'"
        )
    return values


def _parse_config_file(p: Path) -> dict:
    """The file's content as a dict (an empty file: {}); a ConfigError naming the file for anything else."""
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config {p}: use a .toml, .yaml, .yml or .json file")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config {p} is not valid {suffix[1:].upper()}: {e}") from None
    except Exception as e:  # yaml.YAMLError and its subclasses
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config {p} is not valid {suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p} must hold a table of settings (key = value), not a {type(data).__name__}")
    return data


def _yaml_float(value, field):
    """A string value of a float field as its number: YAML 1.1 reads 3e-3 (no dot) as a string."""
    if isinstance(value, str) and isinstance(field.default, float) and not isinstance(field.default, bool):
        try:
            return float(value)
        except ValueError:
            pass  # reported by the dataclass with its type
    return value
