"""Where a run starts from, and the checkpoints that let it start again exactly where it stopped.

A run starts one of three ways:
  fresh        a new --out (refused when it already holds a run); the model's shape from the flags
  --init RUN   fresh, from another run's model shape, tokenizer and weights (fine-tuning starts so)
  --resume     the run's own saved settings, overridden only by the flags typed now (a shape flag that
               differs is refused: the weights fix the shape); its checkpoint restores the weights, the
               optimizer, the sampler's position, the RNG and the counters, so the resumed run equals one
               never interrupted, bit for bit
A budget typed on resume that differs from the run's extends it: the rest is a new schedule phase
(gradlm/training/budget.py) that warms the learning rate up again. A budget already spent is refused.

A checkpoint is the pair (training state, weights), written by RunDir.save_checkpoint; the state is
what checkpoint_state() collects here and restore_checkpoint() puts back.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, fields


from gradlm.files import check_output
from gradlm.training.config import BUDGETS, OPTIMIZER_SETTINGS, PER_INVOCATION, TrainConfig, resume_settings
from gradlm.errors import ConfigError, RunDirError, flag
from gradlm.model.transformer import ModelConfig
from gradlm.training.optim import DEFAULT_LR, base_lrs, override_hyperparams
from gradlm.rundir import RunDir
from gradlm.text.tokenizer import Tokenizer


@dataclass
class Start:
    """The settings a run starts with, and what it starts from."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    # the tokenizer the run must use (--init's, or the resumed run's own); None: from the data
    init_tok: Tokenizer | None
    tokenizer_trained_here: bool | None  # on resume, whether the run trained its tokenizer; None: not known yet
    saved_cfg: TrainConfig | None = None  # on resume, the run's settings before this invocation
    saved_data: dict = field(default_factory=dict)  # on resume, where the run's tokens were, and their identity
    notes: list[str] = field(default_factory=list)  # what this invocation changed, said once the log is set up


def fresh_start(run: RunDir, model_cfg: ModelConfig, cfg: TrainConfig) -> Start:
    """A new run at run (refused if one is there), from the flags or from --init's model and tokenizer."""
    out = check_output(run.path, "--out", is_dir=True)
    if run.exists():
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    init_tok = None
    if cfg.init:
        init = RunDir(cfg.init)
        dropout = model_cfg.dropout
        model_cfg = init.model_config()
        model_cfg.dropout = dropout
        init_tok = init.load_tokenizer()
    return Start(model_cfg, cfg, init_tok, None)


def resume_start(
    run: RunDir, model_cfg: ModelConfig, cfg: TrainConfig, given: set[str], given_model: set[str]
) -> Start:
    """The saved run's settings with the typed flags applied; a shape flag that differs is a ConfigError."""
    if not run.exists():
        raise RunDirError(
            f"cannot resume: {cfg.out} is not a run directory (no config.json); drop --resume to start it"
        )
    saved = run.read_config()
    saved_model = run.model_config()
    for name in sorted(given_model - {"dropout", "vocab_size"}):  # vocab_size comes from the tokenizer, not a flag
        if getattr(model_cfg, name) != getattr(saved_model, name):
            raise ConfigError(
                f"{flag(name)} {getattr(model_cfg, name)} cannot change on --resume (the model's shape is fixed by "
                "its weights: "
                f"{name} is {getattr(saved_model, name)}); drop it, or start a new run with --init {cfg.out}"
            )
    if "dropout" in given_model:
        saved_model.dropout = model_cfg.dropout
    saved_cfg = TrainConfig.from_dict(saved.get("train", {}))
    new = resume_settings(saved_cfg, cfg, given)
    new.validate()
    notes = [
        f"{flag(name)}: {getattr(saved_cfg, name)!r} -> {getattr(new, name)!r}"
        for name in sorted(given - set(PER_INVOCATION))
        if getattr(new, name) != getattr(saved_cfg, name)
    ]
    saved_data = saved.get("data", {})
    return Start(
        saved_model, new, run.load_tokenizer(), saved_data.get("tokenizer") == "trained", saved_cfg, saved_data, notes
    )


# ---- the training state of a checkpoint ------------------------------------------------------------------


@dataclass
class TrainState:
    """A run's counters, in one place: the Trainer owns it (t.state, read as t.step, t.best_val, ...), a checkpoint
    saves and restores it whole, and an evaluation or a guard restore updates it through its methods, so no other
    module writes the trainer's attributes. (The budget's clock and phase are saved beside it: Budget.STATE.)"""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without an improvement of --min-delta (early stopping)
    guard_used: int = 0  # divergence-guard restores so far
    eval_history: list = field(default_factory=list)  # (validation loss, training loss, step) of each evaluation
    path_at: float = 0.0  # --snapshots: the budget's progress (0-1) at the last snapshot of the path

    def snapshot_due(self, progress: float, n: int) -> bool:
        """--snapshots n: whether the run, now at progress (0-1 of its budget), has passed one of the points
        k / (n + 1), k = 1..n, since its last snapshot (then this one is recorded as taken). The end of the
        budget never is: the final weights are the checkpoint."""
        if not n or progress >= 1 or _point(progress, n) <= _point(self.path_at, n):
            return False
        self.path_at = progress
        return True

    def evaluated(self, val_loss: float, train_loss: float, min_delta: float) -> bool:
        """Record an evaluation at the current step; True if it improved on the best by more than min_delta."""
        improved = val_loss < self.best_val - min_delta
        self.best_val, self.bad_evals = (val_loss, 0) if improved else (self.best_val, self.bad_evals + 1)
        self.eval_history.append((val_loss, train_loss, self.step))
        return improved

    def restarted(self) -> int:
        """The divergence guard restored an earlier state: the number of restores so far."""
        self.guard_used += 1
        return self.guard_used

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict) -> None:
        """The counters a checkpoint holds (one from before a counter existed keeps its default)."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


def _point(progress: float, n: int) -> int:
    """How many of the n snapshot points k / (n + 1) progress has reached (steps / max_steps: exactly)."""
    return math.floor(progress * (n + 1) + 1e-9)


def checkpoint_state(t) -> dict:
    """What a checkpoint keeps of a Trainer besides its weights: counters, clock, optimizer, sampler, RNG."""
    state = t.state.state_dict()
    state.update(t.budget.state_dict())
    # CPU and CUDA generators
    state.update(optimizer=t.opt.state_dict(), sampler=t.sampler.state_dict(), torch_rng=t.rt.rng_state())
    return state


def restore_checkpoint(t, state: dict) -> None:
    """Put a checkpoint back into a Trainer, then apply what the caller typed: optimizer settings (the
    learning rate really used goes in config.json) and a budget extension."""
    cfg = t.cfg
    t.restore_weights(cfg.from_best)
    t.opt.load_state_dict(state["optimizer"])
    t.sampler.load_state_dict(state["sampler"])
    t.rt.set_rng_state(state["torch_rng"])
    t.state.load_state_dict(state)
    t.budget.load_state_dict(state)
    given_opt = {k: getattr(cfg, k) for k in OPTIMIZER_SETTINGS if k in t.given}
    if "lr" in given_opt and not given_opt["lr"]:
        given_opt["lr"] = DEFAULT_LR[cfg.optimizer]
    override_hyperparams(t.opt, **given_opt)
    lrs = base_lrs(t.opt)  # what the optimizer really uses (guard halvings included)
    cfg.lr = lrs["lr"]
    cfg.muon_lr = lrs.get("lr_muon", cfg.muon_lr)
    extend_budget(t)
    where = "best checkpoint" if cfg.from_best else "checkpoint"
    t.notes.insert(0, f"resumed {t.out} from its {where} at step {t.step}")
    t.pending_events.insert(0, ("resumed", t.notes[0]))  # before a budget extension's


def extend_budget(t) -> None:
    """A budget typed on resume that differs from the run's: refuse one already spent; otherwise the rest
    of the run is a new schedule phase that warms the learning rate up again, from the factor reached to
    the peak (a typed --lr, else the run's own peak), and decays it over the new budget."""
    cfg, saved, budget = t.cfg, t.saved_cfg, t.budget
    changed = [b for b in BUDGETS if b in t.given and getattr(cfg, b) != getattr(saved, b)]
    # Spent: by the rule that stops the loop (the final evaluation's reserve included), or by the verdict the
    # run itself recorded when it stopped at this very checkpoint (a budget can run out during an evaluation,
    # after the checkpoint was written).
    last = t.run.read_summary()
    stopped_here = last.get("stop") == "budget" and last.get("steps") == t.step and not cfg.from_best
    spent = budget.progress() >= 1 or (stopped_here and not changed)
    done = f"{t.step} steps, {t.tokens_seen:,} tokens, {budget.elapsed:.1f}s, {t.epochs_done():.2f} epochs"
    if spent and changed:
        flags = ", ".join(f"{flag(b)} {getattr(cfg, b)}" for b in changed)
        raise ConfigError(
            f"{flags} is already spent: {t.out} has trained {done}; give a larger budget to train further"
        )
    if spent:
        given = ", ".join(f"{flag(b)} {getattr(cfg, b)}" for b in BUDGETS if getattr(cfg, b))
        raise ConfigError(
            f"{t.out} has finished its budget ({given}; trained {done}); to train further, give a larger budget "
            f"(e.g. --max-steps {2 * t.step}): the learning rate warms up again to the run's peak (or to --lr) and "
            "decays over the new budget"
        )
    if changed:  # --snapshots: the rest of the path at the points of the new budget
        t.state.path_at = min(t.state.path_at, budget.progress())
    if changed and t.step > 0:
        # a fifth of the phase at most
        warmup = max(1, min(max(cfg.warmup_steps, 10), budget.steps_left(t.step_tokens, t.steps_per_epoch()) // 5))
        budget.start_phase(warmup)
        lr, factor = base_lrs(t.opt)["lr"], budget.last_factor
        whose = "--lr" if "lr" in t.given else "the run's peak"
        flags = ", ".join(f"{flag(b)} {getattr(cfg, b)}" for b in changed)
        rise = f"warms the learning rate up from {lr * factor:.3g} to {lr:.3g} ({whose}) over {warmup} steps"
        t.notes.append(
            f"budget extended ({flags}): a new {cfg.schedule} phase "
            f"{rise if factor < 0.999 else f'keeps the learning rate at {lr:.3g} ({whose})'}, "
            f"then decays it to {lr * cfg.min_lr_ratio:.3g} over the rest of the budget"
        )
        t.pending_events.append(("budget_extended", t.notes[-1]))
