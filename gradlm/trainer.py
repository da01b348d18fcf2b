"""The gradient-descent loop: cost -> gradients -> update, repeated until a budget ends or it converges.

One step:
    for each micro-batch:   loss = cross-entropy(model(x), y) * (its share of the step's tokens)
                            loss.backward()                     (gradients accumulate)
    clip the gradient norm; check the loss and the norm are sane (divergence guard)
    lr = base_lr * schedule(progress);  optimizer.step()       (the gradient-descent update)

The batch mode decides how much data one step sees: --batch full is batch gradient descent (one update
per pass over every training window), --batch 1 is stochastic gradient descent, --batch N is mini-batch.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gradlm.checkpoint import check_output
from gradlm.config import BUDGETS, DEFAULT_STEPS, OPTIMIZER_SETTINGS, PER_INVOCATION, TrainConfig, check_budgets, given_fields, parse_duration, resume_settings
from gradlm import autosize
from gradlm.data import EpochSampler, RandomSampler, is_prepared, resolve_data, source_bytes, windows
from gradlm.errors import ConfigError, Interrupted, RunDirError
from gradlm.evaluate import byte_bits
from gradlm.model import GPT, ModelConfig
from gradlm.monitor import DivergenceGuard, StopSignals, TrainLog, diverged, overfitting  # noqa: F401  (diverged, overfitting: public rules)
from gradlm.optim import DEFAULT_LR, fast_matmul_dtype, base_lrs, build_optimizer, lr_factor, override_hyperparams, set_lr
from gradlm.rundir import Metrics, RunDir, read_metrics


# ---- distributed -------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(cfg: TrainConfig, dd: Dist) -> str:
    if cfg.device == "auto":
        return f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return cfg.device


# ---- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_windows(model: GPT, tokens: np.ndarray, block: int, max_tokens: int, byte_lengths: torch.Tensor, batch: int = 32, dd: Dist = Dist(), autocast=nullcontext) -> dict:
    """Mean loss and bits per byte over fixed, evenly spaced, non-overlapping windows of `tokens`.

    Bits per byte = total loss in bits / total bytes of the predicted tokens: independent of the
    tokenizer, so runs with different vocabularies compare fairly. Special tokens cover no bytes and
    are left out of it.
    """
    n_windows = (len(tokens) - 1) // block
    if n_windows < 1:
        return {"loss": float("nan"), "bpb": float("nan"), "tokens": 0}
    take = max(1, min(n_windows, max_tokens // block))
    starts = (np.linspace(0, n_windows - 1, take).round().astype(np.int64) * block)[dd.rank :: dd.world]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, token count, bits on bytes, bytes
    for i in range(0, len(starts), batch):
        x, y = windows(tokens, starts[i : i + batch].tolist(), block)
        x, y = x.to(device), y.to(device)
        with autocast():
            loss = model(x, y, reduction="none").double()  # (B, T)
        bits, nbytes = byte_bits(loss, y, byte_lengths)
        sums += torch.stack([loss.sum(), torch.tensor(loss.numel(), device=device, dtype=torch.float64), bits, nbytes])
    if dd.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    bpb = (sums[2] / sums[3]).item() if sums[3] > 0 else float("nan")
    return {"loss": loss, "bpb": bpb, "tokens": int(sums[1].item())}


# ---- the run -----------------------------------------------------------------------------------------


def _log(dd: Dist, msg: str) -> None:
    if dd.main:
        tqdm.write(msg, file=sys.stderr)


class Trainer:
    """Everything one run holds: data, model, optimizer, sampler, batch geometry and counters.

    `gradients()` runs one step's forward and backward passes over its micro-batches and clips the
    gradient; `update()` applies the optimizer step. train() loops over these; the LR finder reuses
    them with learning rates of its own. Construction reads in this order: settings (fresh, resumed
    or initialised from another run), data, model and optimizer, then the resumed state.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, log=None, given: Iterable[str] | None = None):
        _validate_all(model_cfg, cfg)
        model_cfg, cfg = copy.deepcopy(model_cfg), copy.deepcopy(cfg)  # the caller's settings stay as they were
        self.run = RunDir(cfg.out)
        self.lock = None
        if cfg.resume and self.run.exists() and int(os.environ.get("RANK", "0")) == 0:
            self.lock = self.run.lock().acquire()  # before reading the run: no other process changes it under us
        try:
            self._setup(model_cfg, cfg, log, given)
        except BaseException:
            self.close_run_dir()
            raise

    def _setup(self, model_cfg: ModelConfig, cfg: TrainConfig, log, given: Iterable[str] | None) -> None:
        typed = given_fields(cfg, given)
        typed_model = given_fields(model_cfg, given)
        self.notes: list[str] = []  # what a resume changed, said once the log is set up
        if cfg.resume:
            model_cfg, cfg = self._resume_settings(model_cfg, cfg, typed, typed_model)
        else:
            model_cfg = self._fresh_settings(model_cfg, cfg)
        unset = TrainConfig()
        check_budgets(cfg, {b for b in typed if getattr(cfg, b) != getattr(unset, b)})  # e.g. max_time="0" (the CLI checks typed flags)
        if not any(getattr(cfg, b) for b in BUDGETS):
            cfg.max_steps = DEFAULT_STEPS
            self.notes.append(f"no budget given: training for {DEFAULT_STEPS} steps, the default (set --max-steps, --max-tokens, --max-time or --max-epochs)")
        # --size auto: the default for a new run given no model-shape flag (or asked for with --size auto)
        self.auto = (not cfg.resume and not cfg.init and cfg.size == "auto"
                     and ("size" in typed or not typed_model & set(autosize.MODEL_KEYS)))
        self.fixed = {k: getattr(model_cfg, k) for k in typed_model & {*autosize.MODEL_KEYS, "dropout"}}
        self.fixed.update({k: getattr(cfg, k) for k in typed & set(autosize.TRAIN_KEYS)})
        self.cfg, self.out, self.typed = cfg, self.run.path, typed
        self.max_time_s = parse_duration(cfg.max_time)
        self.dd = init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = pick_device(cfg, self.dd)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        self.log = log or (lambda msg: _log(self.dd, msg))
        # A resume restores a checkpoint, unless the run stopped before its first one: then it starts again
        # from its settings (and from its --init weights, if it has any).
        self.restoring = cfg.resume and (cfg.from_best or self.run.checkpoint_path().is_file())
        self.config_extra: dict = {}  # more sections of config.json (--size auto sets "size", fine-tuning "finetune")
        self._choose_dtype()
        if self.auto and "vocab_size" not in typed and not is_prepared(cfg.data):
            cfg.vocab_size = autosize.choose_vocab(source_bytes(cfg.data))
        self._load_data(model_cfg)
        if self.auto:
            self._auto_size()
        cfg.lr = cfg.lr or DEFAULT_LR[cfg.optimizer]  # config.json records the learning rate really used
        self._check_data_length()
        self._build()
        self.step, self.tokens_seen, self.elapsed, self.train_time = 0, 0, 0.0, 0.0
        self.reserve_s = 0.0  # time kept back from --max-time for the final evaluation and checkpoint
        self.step_s, self.eval_s, self.eval_step_s = 0.0, 0.0, 0.0  # recent step time; last evaluation's time and the step time then
        self.saved_step = -1
        self.best_val, self.bad_evals, self.guard_used = float("inf"), 0, 0
        self.gap_history: list[float] = []
        self.last_factor, self.phase = 1.0, None
        self.resumed = cfg.resume
        self.report: dict = {}  # more fields of the summary (fine-tuning: trainable parameters, optimizer memory)
        self.command = "train"  # the gradlm command that resumes this run
        if cfg.resume and not self.restoring:
            self.notes.append(f"{self.out} has no checkpoint yet (it stopped before its first one): starting it from step 0 with its saved settings")
        elif self.restoring:
            self._restore(self.run.load_state(cfg.from_best))
        self.metrics = Metrics(self.run.metrics, self.dd.main)

    # -- settings: where the run starts from

    def _fresh_settings(self, model_cfg: ModelConfig, cfg: TrainConfig) -> ModelConfig:
        out = check_output(self.run.path, "--out", is_dir=True)
        if self.run.exists():
            raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        self.init_tok = None
        if cfg.init:
            init = RunDir(cfg.init)
            dropout = model_cfg.dropout
            model_cfg = init.model_config()
            model_cfg.dropout = dropout
            self.init_tok = init.load_tokenizer()
        self.tokenizer_trained_here = None  # decided by resolve_data: trained when no tokenizer is given
        return model_cfg

    def _resume_settings(self, model_cfg: ModelConfig, cfg: TrainConfig, typed: set[str], typed_model: set[str]) -> tuple[ModelConfig, TrainConfig]:
        if not self.run.exists():
            raise RunDirError(f"cannot resume: {cfg.out} is not a run directory (no config.json); drop --resume to start it")
        saved = self.run.read_config()
        saved_model = self.run.model_config()
        for name in sorted(typed_model - {"dropout", "vocab_size"}):  # vocab_size comes from the tokenizer, not a flag
            if getattr(model_cfg, name) != getattr(saved_model, name):
                raise ConfigError(
                    f"--{name.replace('_', '-')} {getattr(model_cfg, name)} cannot change on --resume (the model's shape is fixed by its weights: "
                    f"{name} is {getattr(saved_model, name)}); drop it, or start a new run with --init {cfg.out}"
                )
        if "dropout" in typed_model:
            saved_model.dropout = model_cfg.dropout
        saved_cfg = TrainConfig.from_dict(saved.get("train", {}))
        new = resume_settings(saved_cfg, cfg, typed)
        new.validate()
        for name in sorted(typed - set(PER_INVOCATION)):
            if getattr(new, name) != getattr(saved_cfg, name):
                self.notes.append(f"--{name.replace('_', '-')}: {getattr(saved_cfg, name)!r} -> {getattr(new, name)!r}")
        self.saved_cfg = saved_cfg
        self.saved_data = saved.get("data", {})  # where the run's tokens were, and their identity
        self.init_tok = self.run.load_tokenizer()
        self.tokenizer_trained_here = self.saved_data.get("tokenizer") == "trained"
        return saved_model, new

    # -- data: rank 0 prepares (and caches); the other ranks then read the same cache

    def _load_data(self, model_cfg: ModelConfig) -> None:
        cfg, dd = self.cfg, self.dd
        trained = self.tokenizer_trained_here if self.cfg.resume else None
        saved = getattr(self, "saved_data", {}) if cfg.resume else {}
        where = dict(identity=saved.get("identity", ""), hint=saved.get("path", ""))  # a resume reads its own tokens, offline
        data = resolve_data(cfg, self.init_tok, self.log, trained, **where) if dd.main else None
        if dd.world > 1:
            dist.barrier()
            data = data or resolve_data(cfg, self.init_tok, self.log, trained, **where)
        self.data, self.tok = data, data.tokenizer
        if self.init_tok is not None and self.init_tok.sha256 != self.tok.sha256:
            raise ConfigError(f"{cfg.data} was tokenised with another tokenizer than {cfg.init or cfg.out}; pass raw text so it is tokenised with the run's tokenizer")
        if self.init_tok is None:
            model_cfg.vocab_size = self.tok.vocab_size
        if self.tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tok.vocab_size} ids but the model only {model_cfg.vocab_size}")
        self.model_cfg = model_cfg
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")

    def _check_data_length(self) -> None:
        block = self.block = self.model_cfg.block_size
        for name, toks, fix in (("training", self.train_tokens, "add text"), ("validation", self.val_tokens, "raise --val-fraction or add text")):
            if len(toks) < block + 1:
                raise ConfigError(f"the {name} split has {len(toks):,} tokens, fewer than the context window + 1 ({block + 1}); lower --block-size or {fix}")

    def _auto_size(self) -> None:
        """--size auto: choose the shape, batch, learning rate, warmup, dropout and evaluation cadence for the
        budget, the corpus and this machine's measured speed (gradlm/autosize.py); the settings the caller
        gave are kept. Rank 0 chooses and every other rank takes its choice (probes could differ by rank)."""
        cfg, m = self.cfg, self.model_cfg
        seconds = self.max_time_s
        budget = autosize.Budget(
            seconds=seconds, tokens=cfg.max_tokens or int(cfg.max_epochs * len(self.train_tokens)),
            steps=cfg.max_steps)
        shortest = min(len(self.train_tokens), len(self.val_tokens)) - 1
        tokens = self.train_tokens

        def sample(batch: int, block: int):
            starts = torch.randint(0, len(tokens) - block, (batch,), generator=torch.Generator().manual_seed(0))
            x, y = windows(tokens, starts, block)
            return x.to(self.device), y.to(self.device)

        probe = autosize.Probe(sample, self.autocast, self.device, limit_s=0.05 * seconds) if seconds else None
        t0 = time.time()
        choice = autosize.choose(budget, len(tokens), probe, m.vocab_size, self.fixed, max_block=max(shortest, 2)) if self.dd.main else None
        if self.dd.world > 1:
            shared = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        probe_s = time.time() - t0
        for k, v in choice.model.items():
            setattr(m, k, v)
        for k, v in choice.train.items():
            if k != "lr" or cfg.optimizer in ("adamw", "muon"):
                setattr(cfg, k, v)
        m.validate()
        self.log(choice.reason + (f" (probe {probe_s:.1f} s, apart from the budget like data preparation)" if probe else ""))
        self.config_extra["size"] = {"reason": choice.reason, "probe_s": round(probe_s, 2), "tokens_per_param": autosize.TOKENS_PER_PARAM}

    # -- model, optimizer, sampler, batch geometry

    def _build(self) -> None:
        cfg, dd, block = self.cfg, self.dd, self.block
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_cfg)
        self.model.reset_parameters(seed=cfg.seed)
        if cfg.init and not self.restoring:
            RunDir(cfg.init).load_weights_into(self.model)
            self.log(f"initialised from {cfg.init}")
        self.adapt_model()
        self.model.to(self.device)
        self.opt = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, (cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)
        self.full_batch = cfg.batch == "full"
        self.sampler_kind = "epoch" if self.full_batch or cfg.sampler == "epoch" else "random"
        self.masked_targets = False  # True when the sampler's targets hold -1 (fine-tuning data): see gradients()
        self.sampler = self.make_sampler()
        if self.full_batch:  # batch gradient descent: all windows, accumulated, per update
            self.micro = cfg.micro_batch or 32
            self.batch = self.sampler.n_windows
        else:
            self.micro = cfg.micro_batch or int(cfg.batch)
            self.batch = int(cfg.batch) * cfg.accum
        self.accum = math.ceil(self.batch / self.micro)
        if self.micro % dd.world:
            raise ConfigError(f"the micro-batch ({self.micro}) must divide evenly over {dd.world} processes; set --micro-batch to a multiple of {dd.world}")
        self.step_tokens = self.batch * block
        self.run_model = torch.compile(self.model) if cfg.compile else self.model
        if dd.world > 1:
            self.run_model = torch.nn.parallel.DistributedDataParallel(self.run_model, device_ids=[dd.local_rank] if self.device.startswith("cuda") else None)
        self.byte_lengths = torch.tensor(self.tok.token_byte_lengths(), dtype=torch.long, device=self.device)

    def _choose_dtype(self) -> None:
        """bf16 autocast where the hardware multiplies bf16 natively (CUDA; CPUs with AMX or AVX512-BF16), decided
        from the device's features so every resume and every rank agrees; weights and optimizer state stay fp32."""
        cfg, device_type = self.cfg, self.device.split(":")[0]
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and fast_matmul_dtype(device_type) == torch.bfloat16)
        self.compute_dtype = "bfloat16" if use_bf16 else "float32"
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # Hooks that fine-tuning (gradlm/finetune.py) overrides; pretraining uses them as they are.

    def adapt_model(self) -> None:
        """Change the model after its weights are loaded and before the optimizer sees it (freeze layers,
        add adapters): the optimizer takes only parameters that require gradients."""

    def make_sampler(self):
        """The sampler of training batches: next(n) -> (x, y), with position, epochs and state_dict."""
        sampler = (EpochSampler if self.sampler_kind == "epoch" else RandomSampler)(self.train_tokens, self.block, self.cfg.seed)
        if self.cfg.bpe_dropout or self.cfg.typo_rate:  # re-split / misspell the inputs (gradlm/robust.py)
            from gradlm.robust import RobustSampler

            self.masked_targets = True  # inputs that do not line up with a clean token have no target
            sampler = RobustSampler(sampler, self.tok, self.cfg.bpe_dropout, self.cfg.typo_rate, self.cfg.seed, self.block)
        return sampler

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint saves (all weights; a LoRA run saves its adapter only)."""
        return self.model.state_dict()

    def restore_weights(self, best: bool) -> None:
        """Load the checkpoint's weights (written by checkpoint_weights) into the model."""
        self.run.load_weights_into(self.model, best=best)

    def data_summary(self) -> dict:
        """The "data" section of config.json."""
        trained = self.tokenizer_trained_here if self.resumed else self.init_tok is None
        return {"path": str(self.data.path), "tokenizer": "trained" if trained else "given", "tokenizer_sha256": self.tok.sha256,
                "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens), "identity": self.data.identity}

    # -- resume: restore the checkpoint, then apply what the caller typed

    # elapsed: wall time since the first step, evaluations and checkpoints included (what --max-time
    # bounds); train_time: the steps alone (what tokens/s divides by).
    # reserve_s is kept so a resume judges "finished" by the very rule that stopped the run.
    COUNTERS = ("step", "tokens_seen", "elapsed", "train_time", "best_val", "bad_evals", "guard_used", "gap_history", "last_factor", "phase",
                "reserve_s", "step_s", "eval_s", "eval_step_s")

    def _restore(self, state: dict) -> None:
        cfg = self.cfg
        self.restore_weights(cfg.from_best)
        self.opt.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        for k in self.COUNTERS:
            if k in state:
                setattr(self, k, state[k])
        given_opt = {k: getattr(cfg, k) for k in OPTIMIZER_SETTINGS if k in self.typed}
        if "lr" in given_opt and not given_opt["lr"]:
            given_opt["lr"] = DEFAULT_LR[cfg.optimizer]
        override_hyperparams(self.opt, **given_opt)
        lrs = base_lrs(self.opt)  # what the optimizer really uses (guard halvings included) goes in config.json
        cfg.lr = lrs["lr"]
        cfg.muon_lr = lrs.get("lr_muon", cfg.muon_lr)
        self._extend_budget()
        where = "best checkpoint" if cfg.from_best else "checkpoint"
        self.notes.insert(0, f"resumed {self.out} from its {where} at step {self.step}")

    def _extend_budget(self) -> None:
        """A budget typed on resume that differs from the run's: refuse one already spent; otherwise the rest
        of the run is a new schedule phase that warms the learning rate up again, from the factor reached to
        the peak (a typed --lr, else the run's own peak), and decays it over the new budget."""
        cfg, saved = self.cfg, self.saved_cfg
        changed = [b for b in BUDGETS if b in self.typed and getattr(cfg, b) != getattr(saved, b)]
        # Spent: by the rule that stops the loop (the final evaluation's reserve included), or by the verdict the
        # run itself recorded when it stopped at this very checkpoint (a budget can run out during an evaluation,
        # after the checkpoint was written).
        last = self.run.read_summary()
        stopped_here = last.get("stop") == "budget" and last.get("steps") == self.step and not cfg.from_best
        spent = self.progress() >= 1 or (stopped_here and not changed)
        done = f"{self.step} steps, {self.tokens_seen:,} tokens, {self.elapsed:.1f}s, {self.epochs_done():.2f} epochs"
        if spent and changed:
            flags = ", ".join(f"--{b.replace('_', '-')} {getattr(cfg, b)}" for b in changed)
            raise ConfigError(f"{flags} is already spent: {self.out} has trained {done}; give a larger budget to train further")
        if spent:
            budget = ", ".join(f"--{b.replace('_', '-')} {getattr(cfg, b)}" for b in BUDGETS if getattr(cfg, b))
            raise ConfigError(
                f"{self.out} has finished its budget ({budget}; trained {done}); to train further, give a larger budget "
                f"(e.g. --max-steps {2 * self.step}): the learning rate warms up again to the run's peak (or to --lr) and decays over the new budget"
            )
        if changed and self.step > 0:
            warmup = max(1, min(max(cfg.warmup_steps, 10), self._steps_left() // 5))  # a fifth of the phase at most
            self.phase = {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed, "epochs": self.epochs_done(),
                          "warm_from": self.last_factor, "warmup": warmup}
            lr = base_lrs(self.opt)["lr"]
            whose = "--lr" if "lr" in self.typed else "the run's peak"
            rise = f"warms the learning rate up from {lr * self.last_factor:.3g} to {lr:.3g} ({whose}) over {warmup} steps"
            self.notes.append(
                f"budget extended: a new {cfg.schedule} phase {rise if self.last_factor < 0.999 else f'keeps the learning rate at {lr:.3g} ({whose})'}, "
                f"then decays it to {lr * cfg.min_lr_ratio:.3g} over the rest of the budget"
            )

    def _steps_left(self) -> int:
        """About how many updates the budget has left (for time, at the pace of the last steps run)."""
        cfg, left = self.cfg, []
        if cfg.max_steps:
            left.append(cfg.max_steps - self.step)
        if cfg.max_tokens:
            left.append((cfg.max_tokens - self.tokens_seen) / self.step_tokens)
        if cfg.max_epochs:
            left.append((cfg.max_epochs - self.epochs_done()) * len(self.train_tokens) / self.step_tokens)
        if self.max_time_s and self.step_s:
            left.append((self.max_time_s - self.elapsed - self.reserve_s) / self.step_s)
        return max(0, int(min(left))) if left else 1 << 30

    # -- one step of gradient descent

    def gradients(self) -> tuple[float, float]:
        """Forward + backward over this step's micro-batches; returns (loss, gradient norm before clipping).

        The step's loss is the mean over all its targets (positions with y >= 0): each micro-batch's mean
        loss is weighted by its share of the step's targets. A window of text has a target at every
        position; fine-tuning examples mask and pad theirs, so their micro-batches hold different counts."""
        dd = self.dd
        loss_sum = torch.zeros((), device=self.device)
        batches, targets = self._step_batches()
        self.drawn_tokens = 0
        for k, (x, y, positions) in enumerate(batches):  # this rank's rows of the global micro-batch
            self.drawn_tokens += positions
            # This rank's share of the step's targets, times the world size because DDP averages
            # gradients over ranks: summed over ranks and micro-batches, the weights give the gradient
            # of the mean loss over the whole global batch (also when a micro-batch splits unevenly).
            share = int((y >= 0).sum()) / targets * dd.world
            x, y = x.to(self.device), y.to(self.device)
            sync = dd.world == 1 or k == self.accum - 1
            with (nullcontext() if sync else self.run_model.no_sync()), self.autocast():
                loss = self.run_model(x, y)
                (loss * share).backward()
            loss_sum += loss.detach() * share
        if dd.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= dd.world
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        return loss_sum.item(), grad_norm.item()

    def _step_batches(self) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor, int]], int]:
        """This rank's rows (x, y) of this step's global micro-batches, with the positions of each global
        micro-batch, and the number of targets they hold in all.

        Windows of text are drawn one micro-batch at a time as the loop asks (batch gradient descent
        never holds the whole training set): their count is known, batch x block. Masked fine-tuning
        batches are drawn first and counted."""
        sizes = [min(self.micro, self.batch - k * self.micro) for k in range(self.accum)]
        dd = self.dd
        if not self.masked_targets:  # each rank reads only its own windows of text
            def text_windows():
                for n in sizes:
                    x, y = self.sampler.next(n, dd.rank, dd.world)
                    yield x, y, self.sampler.last_rows * self.block  # the global micro-batch's positions, alike on every rank
            return text_windows(), self.batch * self.block
        # masked batches are drawn whole (every rank counts the step's targets), then each takes its rows
        drawn = [self.sampler.next(n) for n in sizes]
        targets = sum(int((y >= 0).sum()) for _, y in drawn)
        return [(x[dd.rank :: dd.world], y[dd.rank :: dd.world], x.numel()) for x, y in drawn], targets

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.drawn_tokens  # positions processed (batch x block for windows of text)

    # -- progress and the learning rate

    def epochs_done(self) -> float:
        return self.sampler.epochs_done if self.sampler_kind == "epoch" else self.tokens_seen / len(self.train_tokens)

    def _spent(self, reserve: bool = True) -> list[tuple[float, float, float]]:
        """(used, budget, used at the phase start) for each budget that is set. Time counts the final
        evaluation's reserve as spent (reserve=True), so training stops in time for it."""
        cfg, ph = self.cfg, self.phase or {}
        parts = [(self.step, cfg.max_steps, ph.get("step", 0)), (self.tokens_seen, cfg.max_tokens, ph.get("tokens", 0)),
                 (self.elapsed + (self.reserve_s if reserve else 0.0), self.max_time_s, ph.get("elapsed", 0.0)), (self.epochs_done(), cfg.max_epochs, ph.get("epochs", 0.0))]
        return [p for p in parts if p[1]]

    def progress(self, reserve: bool = True) -> float:
        """Fraction of the budget spent: the largest of steps, tokens, time and epochs used."""
        return max((used / budget for used, budget, _ in self._spent(reserve)), default=0.0)

    def eta(self) -> float:
        """Seconds left: the rest of the training at the pace so far, plus the final evaluation."""
        p, done = self.progress(), self.progress(reserve=False)
        return self.elapsed / done * max(1 - p, 0.0) + self.reserve_s if done > 0 else float("nan")

    def lr_factor(self) -> float:
        """The schedule's factor for the next step: the run's schedule, or the current phase's when the
        budget was extended on resume (steps and progress counted from the phase start, warming up again
        from the factor the run had reached)."""
        c, ph = self.cfg, self.phase
        if ph is None:
            return lr_factor(self.progress(), self.step, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)
        p = max(((used - start) / max(budget - start, 1e-12) for used, budget, start in self._spent()), default=0.0)
        return lr_factor(p, self.step - ph["step"], c.schedule, ph.get("warmup", 0), c.min_lr_ratio, c.decay_fraction, warm_from=ph.get("warm_from", 0.0))

    # -- evaluation and state

    def evaluate(self) -> dict:
        args = (self.block, self.cfg.eval_tokens, self.byte_lengths, self.micro, self.dd, self.autocast)
        val = evaluate_windows(self.model, self.val_tokens, *args)
        tr = evaluate_windows(self.model, self.train_tokens, *args)
        return {"val_loss": val["loss"], "val_bpb": val["bpb"], "train_eval_loss": tr["loss"]}

    def snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()), "step": self.step, "tokens_seen": self.tokens_seen}

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
        self.step, self.tokens_seen = snap["step"], snap["tokens_seen"]

    def start_run_dir(self) -> None:
        """Create (or reopen) the run directory on rank 0: take the lock, write config.json (the settings
        really used), tokenizer.json, and a fresh or trimmed metrics.jsonl."""
        if not self.dd.main:
            return
        if self.lock is None:
            self.lock = self.run.lock().acquire()
        if self.resumed:
            self.metrics.truncate_after(self.step)
        else:
            if self.run.exists():  # another process made it between our check and the lock
                self.lock.release()
                raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            self.run.metrics.unlink(missing_ok=True)
        self.run.save_tokenizer(self.tok)
        self.run.write_config(self.model_cfg, asdict(self.cfg), self.data_summary(), **self.config_extra)

    def close_run_dir(self) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def save(self) -> None:
        """Checkpoint (rank 0): the training state and the weights, as one pair (see gradlm.rundir)."""
        if not self.dd.main:
            return
        self.saved_step = self.step
        state = {k: getattr(self, k) for k in self.COUNTERS}
        state.update(optimizer=self.opt.state_dict(), sampler=self.sampler.state_dict(), torch_rng=torch.get_rng_state())
        self.run.save_checkpoint(state, self.checkpoint_weights(), self.step)

    def describe(self) -> str:
        m = self.model
        lrs = base_lrs(self.opt)
        lr_text = f"lr {lrs['lr']:g}" + (f" (muon matrices: lr {lrs['lr_muon']:g})" if "lr_muon" in lrs else "")
        return (
            f"model: {m.num_params():,} parameters ({m.num_params(True):,} non-embedding), {m.flops_per_token() / 1e6:.1f} MFLOP/token | "
            f"batch {'full' if self.full_batch else self.batch} = {self.step_tokens:,} tokens/step ({self.accum} x {self.micro} windows x {self.block} tokens) | "
            f"{self.cfg.optimizer}, {lr_text}, {self.cfg.schedule} | device {self.device}, {self.compute_dtype}"
        )


def _validate_all(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Report every problem of both configurations at once, before any work."""
    problems = []
    for c in (cfg, model_cfg):
        try:
            c.validate()
        except ConfigError as e:
            problems.append(str(e))
    if cfg.from_best and not cfg.resume:
        problems.append("--from-best only applies with --resume")
    if problems:
        raise ConfigError("; ".join(problems))


# ---- train() -------------------------------------------------------------------------------------------


def train(model_cfg: ModelConfig, cfg: TrainConfig, on_step=None, given: Iterable[str] | None = None) -> dict:
    """Train a model as configured; returns a summary (final validation loss, bits per byte, steps, ...).

    on_step(step, loss, lr) is called after every update (the comparison lab uses it). given names the
    settings the caller chose (the CLI passes the flags typed); on resume only those override the run's
    saved settings. None means: every field that differs from its default.

    Example:
        >>> train(ModelConfig(n_layer=2), TrainConfig(data="notes.txt", out="runs/notes", max_time="2m"))  # doctest: +SKIP
    """
    t = Trainer(model_cfg, cfg, given=given)
    t.start_run_dir()
    try:
        return _loop(t, on_step)
    finally:
        t.close_run_dir()
        # Under torchrun, drop the DDP wrapper now: its reducer holds gloo work objects, and freed only at
        # interpreter shutdown they abort the process ("terminate called without an active exception").
        t.run_model = t.model


def _loop(t: Trainer, on_step) -> dict:
    cfg, out = t.cfg, t.out
    for note in t.notes:
        t.log(note)
    guard, show = DivergenceGuard(t), TrainLog(t)
    t.log(t.describe())
    t.model.train()
    stop_reason = ""
    clock = time.time()  # --max-time counts wall time from here: steps, evaluations and checkpoints

    def tick() -> None:
        nonlocal clock
        now = time.time()
        t.elapsed += now - clock
        clock = now
        if t.dd.world > 1 and t.max_time_s:  # ranks stop at the same step only if they read the same clock and reserve
            agreed = torch.tensor([t.elapsed, t.train_time, t.reserve_s, t.step_s, t.eval_s, t.eval_step_s], dtype=torch.float64, device=t.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            t.elapsed, t.train_time, t.reserve_s, t.step_s, t.eval_s, t.eval_step_s = agreed.tolist()

    with StopSignals() as signals:
        while True:
            if t.progress() >= 1:
                stop_reason = "budget"
                break
            if cfg.pause_at and t.step >= cfg.pause_at:
                stop_reason = "paused"
                break
            if signals.requested(t.dd):
                stop_reason = "interrupted"
                break
            t0 = time.time()
            t.last_factor = t.lr_factor()
            lrs = set_lr(t.opt, t.last_factor)
            loss, gn = t.gradients()
            if not guard.observe(loss, gn):
                continue
            t.update()
            step_s = time.time() - t0
            t.train_time += step_s
            t.step_s = step_s if not t.step_s else 0.7 * t.step_s + 0.3 * step_s  # recent pace: follows a machine that slows down
            if t.max_time_s:
                # Keep back the final evaluation and checkpoint: the last one's time, scaled up by how much slower
                # steps run now than then (never down: a reserve too small overshoots the budget); before any, a
                # forward pass (a third of a step's work) over eval_tokens of validation and of training text.
                # Computed before tick(), which makes every rank take the largest: they stop at the same step.
                t.reserve_s = (t.eval_s * max(1.0, t.step_s / t.eval_step_s) if t.eval_s
                               else t.step_s * (2 * cfg.eval_tokens / t.step_tokens) / 3 + 0.5)
            tick()
            if on_step is not None:
                on_step(t.step, loss, lrs["lr"])
            show.step(loss, gn, lrs)
            done = t.progress() >= 1 or (cfg.pause_at and t.step >= cfg.pause_at)
            if t.step % cfg.eval_every == 0 or done:
                t0 = time.time()
                converged = _evaluate_and_checkpoint(t, show)
                t.eval_s, t.eval_step_s = time.time() - t0, t.step_s  # the final evaluation costs about the same, at the same pace
                tick()
                if converged:
                    stop_reason = "converged"
                    break
                guard.mark_good()
    show.close()
    if not show.last_eval:
        show.last_eval = t.evaluate()
    if t.saved_step != t.step:
        t.save()
    tick()
    summary = {
        "run": str(out), "steps": t.step, "tokens": t.tokens_seen, "epochs": t.epochs_done(), "time_s": t.elapsed,
        "train_time_s": t.train_time, "tokens_per_s": t.tokens_seen / t.train_time if t.train_time else 0.0, "dtype": t.compute_dtype, "stop": stop_reason, "best_val_loss": t.best_val,
        "divergence_restarts": t.guard_used, **show.last_eval, **t.report,
    }
    if t.dd.main:
        t.run.write_summary(summary)
        if cfg.plots:
            from gradlm.plots import plot_runs

            plot_runs({out.name: read_metrics(out)}, t.run.plots / "training.png", title=str(out))
    if stop_reason == "interrupted":
        name = signal.Signals(signals.signum).name
        raise Interrupted(f"{name}: stopped at step {t.step} and saved a checkpoint in {out}; continue with `gradlm {t.command} --out {out} --resume`", 128 + signals.signum)
    return summary


def _evaluate_and_checkpoint(t: Trainer, show: TrainLog) -> bool:
    """Evaluate, checkpoint (and keep the best), warn on overfitting; True when training converged."""
    cfg = t.cfg
    ev = t.evaluate()
    improved = ev["val_loss"] < t.best_val - cfg.min_delta
    if improved:
        t.best_val, t.bad_evals = ev["val_loss"], 0
    else:
        t.bad_evals += 1
    gap = ev["val_loss"] - ev["train_eval_loss"]
    t.gap_history.append(gap)
    show.evaluation(ev, gap)
    if overfitting(t.gap_history):
        t.log(f"warning: the train/validation gap has grown for 3 evaluations ({t.gap_history[-4]:.3f} -> {gap:.3f}): the model is overfitting (high variance); consider --dropout, --weight-decay, --patience or more data")
    t.save()
    if improved and t.dd.main:
        t.run.mark_best()
    if cfg.patience and t.bad_evals >= cfg.patience:
        t.log(f"converged: validation loss has not improved by {cfg.min_delta} for {cfg.patience} evaluations (best {t.best_val:.4f}); best weights in {t.run.checkpoint_path(best=True)}")
        return True
    return False
