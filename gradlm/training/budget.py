"""How far a run is through its budget, and the clock that measures it.

A run trains until the first of its budgets is spent: --max-steps, --max-tokens, --max-time (wall
time from the first step: steps, evaluations and checkpoints) or --max-epochs. Progress is the largest
share spent of any of them; the learning-rate schedule reads it, so a schedule fits whichever budget
is set. Time counts the final evaluation's reserve as spent, so the run stops in time to evaluate and
checkpoint within its budget.

A budget extended on resume starts a phase: the schedule counts from the phase's start and warms up
again from the factor the run had reached (gradlm/training/resume.py decides when).

Under torchrun every rank must stop at the same step, so the clock and reserve are agreed (the
largest of each) whenever they are read for a decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from gradlm.training.config import TrainConfig, parse_duration
from gradlm.training.optim import lr_factor


class Budget:
    """The budgets of one run, its clock, and the learning-rate phase.

    position() -> (step, tokens seen, epochs done): where the run is, read when needed.
    The clock's fields are part of a checkpoint (state_dict), so a resumed run judges "finished" by the
    very rule that stopped it:
      elapsed      wall time since the first step, evaluations and checkpoints included (what --max-time bounds)
      train_time   the steps alone (what tokens/s divides by)
      reserve_s    time kept back from --max-time for the final evaluation and checkpoint
      step_s       the recent time of one step; eval_s, eval_step_s: the last evaluation's time and step_s then
    """

    CLOCK = ("elapsed", "train_time", "reserve_s", "step_s", "eval_s", "eval_step_s")
    STATE = (*CLOCK, "last_factor", "phase")

    def __init__(self, cfg: TrainConfig, position: Callable[[], tuple[int, int, float]]):
        self.cfg, self.position = cfg, position
        self.max_time_s = parse_duration(cfg.max_time)
        self.elapsed = self.train_time = self.reserve_s = 0.0
        self.step_s = self.eval_s = self.eval_step_s = 0.0
        self.last_factor, self.phase = 1.0, None
        self._clock = time.time()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for k in self.STATE:
            if k in state:  # a checkpoint from before a field existed keeps its default
                setattr(self, k, state[k])

    # -- progress

    def spent(self, reserve: bool = True) -> list[tuple[float, float, float]]:
        """(used, budget, used at the phase start) for each budget that is set. Time counts the final
        evaluation's reserve as spent (reserve=True), so training stops in time for it."""
        cfg, ph = self.cfg, self.phase or {}
        step, tokens, epochs = self.position()
        parts = [
            (step, cfg.max_steps, ph.get("step", 0)),
            (tokens, cfg.max_tokens, ph.get("tokens", 0)),
            (self.elapsed + (self.reserve_s if reserve else 0.0), self.max_time_s, ph.get("elapsed", 0.0)),
            (epochs, cfg.max_epochs, ph.get("epochs", 0.0)),
        ]
        return [p for p in parts if p[1]]

    def progress(self, reserve: bool = True) -> float:
        """Fraction of the budget spent: the largest of steps, tokens, time and epochs used."""
        return max((used / budget for used, budget, _ in self.spent(reserve)), default=0.0)

    def eta(self) -> float:
        """Seconds left: the rest of the training at the pace so far, plus the final evaluation."""
        p, done = self.progress(), self.progress(reserve=False)
        return self.elapsed / done * max(1 - p, 0.0) + self.reserve_s if done > 0 else float("nan")

    def lr_factor(self) -> float:
        """The schedule's factor for the next step: the run's schedule, or the current phase's when the
        budget was extended on resume (steps and progress counted from the phase start, warming up again
        from the factor the run had reached). The loop keeps the one it applies as last_factor."""
        c, ph, step = self.cfg, self.phase, self.position()[0]
        if ph is None:
            return lr_factor(self.progress(), step, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)
        p = max(((used - start) / max(budget - start, 1e-12) for used, budget, start in self.spent()), default=0.0)
        return lr_factor(
            p,
            step - ph["step"],
            c.schedule,
            ph.get("warmup", 0),
            c.min_lr_ratio,
            c.decay_fraction,
            warm_from=ph.get("warm_from", 0.0),
        )

    def steps_left(self, step_tokens: int, steps_per_epoch: float) -> int:
        """About how many updates the budget has left (for time, at the pace of the last steps run)."""
        cfg, left = self.cfg, []
        step, tokens, epochs = self.position()
        if cfg.max_steps:
            left.append(cfg.max_steps - step)
        if cfg.max_tokens:
            left.append((cfg.max_tokens - tokens) / step_tokens)
        if cfg.max_epochs:
            left.append((cfg.max_epochs - epochs) * steps_per_epoch)
        if self.max_time_s and self.step_s:
            left.append((self.max_time_s - self.elapsed - self.reserve_s) / self.step_s)
        return max(0, int(min(left))) if left else 1 << 30

    def start_phase(self, warmup: int) -> None:
        """The rest of the run is a new schedule phase (a budget extended on resume), warming up again
        from the factor the run had reached."""
        step, tokens, epochs = self.position()
        self.phase = {
            "step": step,
            "tokens": tokens,
            "elapsed": self.elapsed,
            "epochs": epochs,
            "warm_from": self.last_factor,
            "warmup": warmup,
        }

    # -- the clock

    def start_clock(self) -> None:
        """--max-time counts wall time from here: steps, evaluations and checkpoints."""
        self._clock = time.time()

    def stepped(self, seconds: float, eval_tokens: int, step_tokens: int, paced: bool = True) -> None:
        """A step took `seconds`: follow the pace, and keep back the time of the final evaluation. paced=False: a step
        that compiled (--compile), whose time says nothing of the pace (a 37 s first step made the reserve for the
        final evaluation outgrow a 2-minute budget: the run stopped after one step)."""
        self.train_time += seconds
        if not paced:
            return
        # recent pace: follows a machine that slows down
        self.step_s = seconds if not self.step_s else 0.7 * self.step_s + 0.3 * seconds
        if self.max_time_s:
            # Keep back the final evaluation and checkpoint: the last one's time, scaled up by how much slower
            # steps run now than then (never down: a reserve too small overshoots the budget); before any, a
            # forward pass (a third of a step's work) over eval_tokens of validation and of training text.
            # Computed before tick(), which makes every rank take the largest: they stop at the same step.
            self.reserve_s = (
                self.eval_s * max(1.0, self.step_s / self.eval_step_s)
                if self.eval_s
                else self.step_s * (2 * eval_tokens / step_tokens) / 3 + 0.5
            )

    def evaluated(self, seconds: float) -> None:
        """An evaluation and checkpoint took `seconds`: the final one costs about the same, at today's pace."""
        self.eval_s, self.eval_step_s = seconds, self.step_s

    def tick(self, world: int = 1, device: str = "cpu") -> None:
        """Add the wall time since the last tick; under torchrun with --max-time, every rank takes the
        largest clock and reserve, so ranks stop at the same step."""
        now = time.time()
        self.elapsed += now - self._clock
        self._clock = now
        if world > 1 and self.max_time_s:
            agreed = torch.tensor([getattr(self, k) for k in self.CLOCK], dtype=torch.float64, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            for k, v in zip(self.CLOCK, agreed.tolist()):
                setattr(self, k, v)
