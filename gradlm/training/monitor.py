"""What watches a run while it trains: the evaluations (checkpoint, best weights, early stopping, the
overfitting warning, a sample of what the model writes), the divergence guard, what the run shows
(progress bar, log lines, metrics.jsonl and samples.jsonl rows: what `gradlm watch` draws) and the
signals that ask it to stop.

Each piece is handed the Trainer (gradlm/training/trainer.py) and reads its counters; none of them decides what a
step of gradient descent is: the loop in gradlm/training/trainer.py calls them, in order, once per step.
"""

from __future__ import annotations

import math
import signal
import sys

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gradlm.errors import Diverged
from gradlm.model.infer import decode
from gradlm.training.optim import base_lrs, scale_base_lr
from gradlm.model.sampling import SamplingConfig


def diverged(loss: float, grad_norm: float, ln_vocab: float, ema: float | None, step: int, start: float = 0.0) -> bool:
    """A step overshot: the loss or gradient is not finite, the loss is far worse than knowing nothing
    (uniform guessing scores ln V) or than where training started (a fine-tune may start above ln V:
    a base model is confidently wrong on new tokens), or it jumped to 3x its recent average and by more
    than a nat (a loss near zero wobbling from 0.05 to 0.2 is noise, not divergence)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return True
    jumped = ema is not None and step > 50 and loss > 3 * ema and loss > ema + 1.0
    return loss > 1.5 * max(ln_vocab, start) or jumped


def gap_widening(gaps: list[float], evals: int = 3, min_gap: float = 0.05) -> bool:
    """Validation loss minus training loss has grown at each of the last `evals` evaluations and is
    now material: the model fits its training text faster than the language (its variance grows)."""
    recent = gaps[-(evals + 1) :]
    return len(recent) == evals + 1 and all(b > a + 1e-3 for a, b in zip(recent, recent[1:])) and recent[-1] > min_gap


def fit_warning(
    history: list[tuple[float, float, int]], evals: int = 3, min_delta: float = 1e-3
) -> tuple[str, str] | None:
    """What the evaluations so far say about variance, as (event kind, message), or None; only at the evaluation
    where it starts to hold, so a run is told once per streak. history: (validation loss, training loss, step) of
    each evaluation.

    Two different things, told apart because a learner who trusts the word stops a run that is still improving:
    - "variance": the train/validation gap has grown at each of the last `evals` evaluations and validation
      still improves (this evaluation is its best). The model learns its training text faster than the language;
      more steps still help.
    - "overfitting": validation has not improved for `evals` evaluations while the training loss kept falling.
      From here more steps make the model worse on new text: the point to stop (best.safetensors keeps the best)."""

    def holds(h: list[tuple[float, float, int]]):
        if len(h) < evals + 1:
            return None
        val, train = [e[0] for e in h], [e[1] for e in h]
        best_before = min(val[:-evals])
        if min(val[-evals:]) > best_before - min_delta and train[-1] < train[-evals - 1] - min_delta:
            return "overfitting"
        # a new best, now
        if gap_widening([v - tr for v, tr in zip(val, train)], evals) and val[-1] < min(val[:-1]) - min_delta:
            return "variance"
        return None

    kind = holds(history)
    if kind is None or holds(history[:-1]) == kind:
        return None
    (v0, t0, at), (v1, t1, _) = history[-evals - 1], history[-1]
    if kind == "overfitting":
        best_val, _, best_step = min(history[:-evals], key=lambda e: e[0])  # the first best
        return kind, (
            f"warning: overfitting: validation loss has not improved for {evals} evaluations (best {best_val:.3f} at "
            "step "
            f"{best_step}, now {v1:.3f}) while training loss fell {t0:.3f} -> {t1:.3f} since step {at}: from here "
            "more steps "
            "make the model worse on new text; stop (best.safetensors keeps the best), or add --dropout, "
            "--weight-decay or data"
        )
    return kind, (
        f"note: variance is growing: the train/validation gap widened for {evals} evaluations ({v0 - t0:.3f} -> "
        f"{v1 - t1:.3f} "
        f"since step {at}) while validation still improves ({v0:.3f} -> {v1:.3f}): keep going; --dropout or "
        "--weight-decay "
        "may let validation improve further"
    )


class DivergenceGuard:
    """When a step overshoots, go back to the last good state with half the learning rate; after
    guard_retries restarts, stop with a message naming the step, the loss and a learning rate to try."""

    def __init__(self, t):  # t: the Trainer (gradlm/training/trainer.py)
        self.t, self.ema = t, None
        self.ln_vocab = math.log(t.model_cfg.vocab_size)
        self.start = 0.0  # the loss of the first step, before any update of this invocation
        self.good = t.snapshot()

    def mark_good(self, val_loss: float) -> None:
        """After an evaluation: this state is the one to come back to, unless its validation loss itself says
        it has diverged (a state worse than guessing is no refuge: every restore would land in it again)."""
        if not diverged(val_loss, 0.0, self.ln_vocab, None, self.t.step, self.start):
            self.good = self.t.snapshot()

    def observe(self, loss: float, grad_norm: float) -> bool:
        """True if the step was sane (apply it); False if the guard restored an earlier state."""
        t = self.t
        if not self.start and math.isfinite(loss):
            self.start = loss
        if not diverged(loss, grad_norm, self.ln_vocab, self.ema, t.step, self.start):
            self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
            return True
        t.opt.zero_grad(set_to_none=True)
        bad_step, bad_tokens = t.step, t.tokens_seen
        t.restore(self.good)
        if t.guard_used >= t.cfg.guard_retries:
            t.save()
            t.event(
                "stopped",
                f"stopped: diverged at step {bad_step} and the guard gave up after {t.guard_used} restarts",
                log=False,
                reason="diverged",
            )
            raise Diverged(
                f"training diverged at step {bad_step} (loss {loss:.4g}, gradient norm {grad_norm:.4g}) and the guard "
                "gave up "
                f"after {t.guard_used} restarts with a halved learning rate; the last good state (step {t.step}) is "
                f"saved in {t.out}. "
                f"Try --lr {base_lrs(t.opt)['lr'] / 2:.2g} or lower (see `gradlm lr-find`)"
            )
        t.state.restarted()
        scale_base_lr(t.opt, 0.5)
        self.good = t.snapshot()
        self.ema = None
        new = base_lrs(t.opt)
        t.event(
            "diverged",
            f"divergence guard: step {bad_step} loss {loss:.4g} (grad norm {grad_norm:.4g}); restored step {t.step}, "
            f"lr halved to {new['lr']:.3g} ({t.guard_used}/{t.cfg.guard_retries})",
            at_step=bad_step,
            at_tokens=bad_tokens,
            loss=loss if math.isfinite(loss) else None,
            new_lr=new["lr"],
        )
        return False


def evaluate_and_checkpoint(t, show: TrainLog) -> bool:
    """Evaluate, checkpoint (and keep the best), warn on overfitting; True when training converged."""
    cfg = t.cfg
    ev = t.evaluate()
    improved = t.state.evaluated(ev["val_loss"], ev["train_eval_loss"], cfg.min_delta)
    gap = ev["val_loss"] - ev["train_eval_loss"]
    show.evaluation(ev, gap, improved)
    warning = fit_warning(t.eval_history)
    if warning:
        t.event(*warning)
    write_sample(t)
    t.save()
    if improved and t.dd.main:
        t.run.mark_best()
    if cfg.patience and t.bad_evals >= cfg.patience:
        t.event(
            "converged",
            f"converged: validation loss has not improved by {cfg.min_delta} for {cfg.patience} evaluations (best "
            f"{t.best_val:.4f}); best weights in {t.run.checkpoint_path(best=True)}",
        )
        return True
    return False


SAMPLING = SamplingConfig(temperature=0.8, top_k=50)  # the evaluation samples: readable, and the same draw each time


@torch.no_grad()
def write_sample(t) -> None:
    """samples.jsonl: what the model writes from the run's fixed prompt (t.sample_prompt_ids()) at this
    evaluation, seeded with the run's seed, so that from one evaluation to the next only the weights change.

    A short decode with the KV cache (gradlm/model/infer.py's decode: training may not import the engine) on rank 0,
    in eval mode (no dropout) and with a generator of its own: the training's random state is untouched, so a
    run with samples resumes bit for bit as one without."""
    if not (t.cfg.sample_tokens and t.dd.main):
        return
    prompt = t.sample_prompt_ids()[-(t.block - 1) :]  # the newest tokens if the prompt fills the window
    n = min(t.cfg.sample_tokens, t.block - len(prompt))
    model, gen = t.model, torch.Generator(device=t.device).manual_seed(t.cfg.seed)
    was_training = model.training
    model.eval()
    try:
        with t.autocast():
            new = decode(model, prompt, n, SAMPLING, gen, vocab_size=t.tok.vocab_size)  # only ids the tokenizer has
    finally:
        model.train(was_training)
    t.samples.write(**t.stamp(), prompt=t.tok.decode(prompt), text=t.tok.decode(new))


class TrainLog:
    """What a run shows while it trains: a progress bar on a terminal (percent of whichever budget is
    set, so its rate and ETA hold for every kind), plain log lines otherwise, and metrics.jsonl rows."""

    def __init__(self, t):  # t: the Trainer (gradlm/training/trainer.py)
        self.t = t
        cfg = t.cfg
        self.bar = tqdm(
            total=100.0,
            initial=round(100 * t.budget.progress(), 2),
            disable=not (cfg.progress and sys.stderr.isatty() and t.dd.main),
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
        )
        self.t_last, self.tokens_since = t.budget.train_time, 0
        self.last_eval: dict = {}

    def step(self, loss: float, grad_norm: float, lrs: dict[str, float]) -> None:
        t, cfg, budget = self.t, self.t.cfg, self.t.budget
        self.tokens_since += t.drawn_tokens  # counted per step: a guard restore moves tokens_seen back
        if t.step % cfg.log_every == 0 or t.step == 1:
            tps = self.tokens_since / max(budget.train_time - self.t_last, 1e-9)  # evaluations excluded
            self.t_last, self.tokens_since = budget.train_time, 0
            eta = budget.eta()
            t.metrics.write(
                **t.stamp(),
                epoch=round(t.epochs_done(), 4),
                **lrs,
                loss=loss,
                grad_norm=grad_norm,
                tokens_per_s=round(tps, 1),
                progress=round(min(budget.progress(), 1.0), 4),
                eta_s=round(eta, 1) if math.isfinite(eta) else None,
            )
            lr_text = " | ".join(f"{k.replace('_', ' ')} {v:.2e}" for k, v in lrs.items())
            if self.bar.disable and cfg.progress:
                t.log(
                    f"step {t.step:>6} | loss {loss:.4f} | {lr_text} | grad norm {grad_norm:.3f} | {tps:,.0f} tok/s | "
                    f"{budget.elapsed:.0f}s, eta {eta:.0f}s"
                )
            self.bar.set_postfix(
                step=t.step,
                loss=f"{loss:.3f}",
                lr=f"{lrs['lr']:.1e}",
                tok_s=f"{tps:,.0f}",
                val=f"{self.last_eval.get('val_loss', float('nan')):.3f}",
            )
        self.bar.update(min(100.0, 100 * budget.progress()) - self.bar.n)

    def evaluation(self, ev: dict, gap: float, best: bool) -> None:
        t = self.t
        self.last_eval = ev
        t.metrics.write(**t.stamp(), epoch=round(t.epochs_done(), 4), **ev, gap=gap, best=best)
        t.log(
            f"step {t.step:>6} | val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.4f} | train loss "
            f"{ev['train_eval_loss']:.4f}"
        )

    def close(self) -> None:
        self.bar.close()


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask training to stop after the current step: it saves a checkpoint
    and says how to resume. A second signal stops at once (the last checkpoint stays intact)."""

    def __init__(self):
        self.signum = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for s, h in self.previous.items():  # a second Ctrl-C is not ignored
            signal.signal(s, h)

    def __enter__(self) -> StopSignals:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self.previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def requested(self, dd, rt) -> int:
        """The signal every rank should stop for (ranks agree, so none waits on another forever); the flag
        is a tensor on the runtime's collective device (nccl reduces CUDA tensors only)."""
        if dd.world > 1:
            flag = rt.tensor([self.signum], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item())
        return self.signum
