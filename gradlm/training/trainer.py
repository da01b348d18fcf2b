"""The gradient-descent loop: cost -> gradients -> update, repeated until a budget ends or it converges.

One step (run() below, top to bottom):
    lr = base_lr * schedule(progress)                            (gradlm/training/budget.py: progress of the budget)
    for each micro-batch:   loss = cross-entropy(model(x), y) * (its share of the step's targets)
                            loss.backward()                      (gradients accumulate)
    clip the gradient norm; check the loss and the norm are sane (the divergence guard, gradlm/training/monitor.py)
    optimizer.step()                                             (the gradient-descent update)
    every --eval-every steps: validation loss (gradlm/model/scoring.py), checkpoint, best weights, early stop

The batch mode decides how much data one step sees: --batch full is batch gradient descent (one update
per pass over every training window), --batch 1 is stochastic gradient descent, --batch N is mini-batch.

Trainer holds what one run needs: settings (gradlm/training/resume.py decides them for a fresh, --init or resumed
run), data, model, optimizer, sampler and counters. Fine-tuning (gradlm/training/finetune.py) is a Trainer whose
public hooks load conversations, choose what trains, what a checkpoint keeps and what validation scores.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gradlm import runtime
from gradlm.training import autosize
from gradlm import files as ckpt
from gradlm.training.budget import Budget
from gradlm.training.config import BUDGETS, DEFAULT_STEPS, FULL_BATCH_MICRO, TrainConfig, check_budgets, given_fields
from gradlm.text.data import EpochSampler, RandomSampler, is_prepared, resolve_data, source_bytes, windows
from gradlm.errors import ConfigError, Diverged, Interrupted, RunDirError, cause
from gradlm.model.compiling import CompileWatch, compiled_before, compiler_failed, remember_compile, use_cache
from gradlm.model.transformer import Transformer, ModelConfig, random_bytes
from gradlm.training.monitor import DivergenceGuard, StopSignals, TrainLog, evaluate_and_checkpoint
from gradlm.training.optim import DEFAULT_LR, base_lrs, build_optimizer, set_lr
from gradlm.training.resume import TrainState, checkpoint_state, fresh_start, restore_checkpoint, resume_start
from gradlm.rundir import Metrics, RunDir, config_dict, read_jsonl
from gradlm.model.scoring import score, spaced_windows
from gradlm.training.trackers import Trackers, parse_loggers


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


# ---- the training data ------------------------------------------------------------------------------------


class TextData:
    """Text cut into windows of the context: what pretraining (and fine-tuning on raw text) trains on.

    The trainer asks its data (this, or fine-tuning's ChatData) for everything that depends on what the
    data is: the sampler of training batches, the windows validation scores, steps per epoch, the prompt
    of the samples and the "data" section of config.json."""

    def __init__(self, data, cfg: TrainConfig, tokenizer_trained_here: bool):
        self.data, self.cfg, self.tok, self.trained_here = data, cfg, data.tokenizer, tokenizer_trained_here
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")

    def check(self, block: int) -> None:
        """Refuse data too short for the model's context window."""
        for name, toks, fix in (
            ("training", self.train_tokens, "add text"),
            ("validation", self.val_tokens, "raise --val-fraction or add text"),
        ):
            if len(toks) < block + 1:
                raise ConfigError(
                    f"the {name} split has {len(toks):,} tokens, fewer than the context window + 1 ({block + 1}); "
                    f"lower --block-size or {fix}"
                )

    def sampler_kind(self, full_batch: bool) -> str:
        return "epoch" if full_batch or self.cfg.sampler == "epoch" else "random"

    def sampler(self, kind: str, block: int):
        """(the sampler of training batches: next(n) -> (x, y), with position, epochs and state_dict;
        whether its targets hold -1, which gradients() counts)."""
        cfg = self.cfg
        sampler = (EpochSampler if kind == "epoch" else RandomSampler)(self.train_tokens, block, cfg.seed)
        if cfg.bpe_dropout or cfg.typo_rate:  # re-split / misspell the inputs (gradlm/text/augment.py)
            from gradlm.text.augment import RobustSampler

            # inputs that do not line up with a clean token have no target
            return RobustSampler(sampler, self.tok, cfg.bpe_dropout, cfg.typo_rate, cfg.seed, block), True
        return sampler, False

    def eval_windows(self, split: str, block: int, micro: int, dd: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The windows validation scores: "val", or "train" (a probe of the training text, for the gap).
        This rank's share of --eval-tokens of evenly spaced windows (the same at every evaluation)."""
        tokens = self.val_tokens if split == "val" else self.train_tokens
        return spaced_windows(tokens, block, self.cfg.eval_tokens, micro, dd.rank, dd.world)

    def steps_per_epoch(self, batch: int, block: int) -> float:
        """Updates in one pass over the training data."""
        return len(self.train_tokens) / (batch * block)

    def epochs(self, tokens_seen: int) -> float:
        """Passes over the training data a random sampler has made, in tokens."""
        return tokens_seen / len(self.train_tokens)

    def sample_prompt_ids(self, block: int) -> list[int]:
        """The fixed prompt of the samples written at every evaluation: --sample-prompt, or the first tokens of
        the validation text (a quarter of the window, at most 16), which the model never trains on."""
        if self.cfg.sample_prompt:
            return self.tok.encode(self.cfg.sample_prompt) or self.val_tokens[:1].tolist()
        return self.val_tokens[: max(1, min(16, block // 4))].tolist()

    def summary(self) -> dict:
        """The "data" section of config.json."""
        return {
            "path": str(self.data.path),
            "tokenizer": "trained" if self.trained_here else "given",
            "tokenizer_sha256": self.tok.sha256,
            "train_tokens": len(self.train_tokens),
            "val_tokens": len(self.val_tokens),
            "identity": self.data.identity,
        }

    def describe(self, t: Trainer) -> str:
        """The run's first log line: the model, the step's batch, the optimizer, the device."""
        m = t.model
        lrs = base_lrs(t.opt)
        lr_text = f"lr {lrs['lr']:g}" + (f" (muon matrices: lr {lrs['lr_muon']:g})" if "lr_muon" in lrs else "")
        return (
            f"model: {m.num_params():,} parameters ({m.num_params(True):,} non-embedding), "
            f"{m.flops_per_token() / 1e6:.1f} MFLOP/token | "
            f"batch {'full' if t.full_batch else t.batch} = {t.step_tokens:,} tokens/step ({t.accum} x {t.micro} "
            f"windows x {t.block} tokens) | "
            f"{t.cfg.optimizer}, {lr_text}, {t.cfg.schedule} | device {t.device}, {t.compute_dtype}"
            + (", compiled" if t.rt.compile else "")
        )


# ---- the run -----------------------------------------------------------------------------------------


def _log(dd: Dist, msg: str) -> None:
    if dd.main:
        tqdm.write(msg, file=sys.stderr)


def _counter(name: str) -> property:
    """Trainer.step etc.: the run's counters live in Trainer.state (a TrainState); these read and set them there."""
    return property(
        lambda t: getattr(t.state, name), lambda t, v: setattr(t.state, name, v), doc=f"Trainer.state.{name}"
    )


class Trainer:
    """Everything one run holds: settings, data, model, optimizer, sampler, batch geometry and counters.

    `gradients()` runs one step's forward and backward passes over its micro-batches and clips the
    gradient; `update()` applies the optimizer step; run() loops over these, and the LR finder reuses
    them with learning rates of its own. Construction reads in this order: settings (fresh, resumed
    or initialised from another run: gradlm/training/resume.py), data, model and optimizer, then the resumed state.

    Construction has two steps: __init__ only keeps the settings; build() decides them (fresh, resumed or
    initialised from another run), loads the data, makes the model and optimizer and restores a checkpoint,
    calling the hooks below on an object whose own __init__ (a subclass's too) has finished.

    The training data is an object of its own (self.source, TextData here; fine-tuning's conversations are
    ChatData in gradlm/training/finetune.py): the sampler, the validation windows, steps per epoch, the sample prompt
    and the "data" section of config.json come from it. Public hooks, which fine-tuning overrides:
        load_data(model_cfg)   the training data (TextData); sets model_cfg's vocabulary
        adapt_model()          change the model before the optimizer sees it (freeze, adapters)
        checkpoint_weights(), restore_weights(best)   what a checkpoint keeps of the model
        start_run_dir()        write the run's files before the first step
    """

    step = _counter("step")  # the counters, each kept in self.state
    tokens_seen = _counter("tokens_seen")
    best_val = _counter("best_val")
    bad_evals = _counter("bad_evals")
    guard_used = _counter("guard_used")
    eval_history = _counter("eval_history")

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, log=None, given: Iterable[str] | None = None):
        """Keep the settings (copies: the caller's stay as they were); build() does the work."""
        _validate_all(model_cfg, cfg)
        self.model_cfg, self.cfg = copy.deepcopy(model_cfg), copy.deepcopy(cfg)
        self.given_arg, self.log_to = given, log
        self.run = RunDir(cfg.out)
        self.trackers: Trackers | None = None  # --logger, opened with the run directory
        self.config_extra: dict = {}  # more sections of config.json (--size auto sets "size", fine-tuning "finetune")
        self.report: dict = {}  # more fields of the summary (fine-tuning: trainable parameters, optimizer memory)
        self.command = "train"  # the gradlm command that resumes this run
        self.built = False

    def build(self) -> Trainer:
        """Decide the settings, load the data, make the model, optimizer and sampler, restore a checkpoint."""
        if self.built:
            return self
        if self.cfg.resume and self.run.exists() and int(os.environ.get("RANK", "0")) == 0:
            self.run.acquire()  # before reading the run: no other process changes it under us
        try:
            self._setup(self.model_cfg, self.cfg, self.log_to, self.given_arg)
        except BaseException:
            self.close_run_dir()
            raise
        self.built = True
        return self

    def _setup(self, model_cfg: ModelConfig, cfg: TrainConfig, log, given: Iterable[str] | None) -> None:
        model_cfg, cfg, given_train = self._settings(model_cfg, cfg, given)
        self._place(cfg, log)
        # A resume restores a checkpoint, unless the run stopped before its first one: then it starts again
        # from its settings (and from its --init weights, if it has any).
        self.restoring = cfg.resume and (cfg.from_best or self.run.checkpoint_path().is_file())
        if self.auto and "vocab_size" not in given_train and not is_prepared(cfg.data):
            cfg.vocab_size = autosize.choose_vocab(source_bytes(cfg.data))
        self.source = self.load_data(model_cfg)
        self.tok, self.model_cfg = self.source.tok, model_cfg
        if self.auto:
            self._auto_size()
        self.block = model_cfg.block_size
        cfg.lr = cfg.lr or DEFAULT_LR[cfg.optimizer]  # config.json records the learning rate really used
        self.source.check(self.block)
        self._build()
        self.saved_step = -1
        self.resumed = cfg.resume
        if cfg.resume and not self.restoring:
            self.notes.append(
                f"{self.out} has no checkpoint yet (it stopped before its first one): starting it from step 0 with "
                "its saved settings"
            )
        elif self.restoring:
            restore_checkpoint(self, self.run.load_state(cfg.from_best))
        self.metrics = Metrics(self.run.metrics, self.dd.main)
        self.samples = Metrics(self.run.samples, self.dd.main)

    def _settings(
        self, model_cfg: ModelConfig, cfg: TrainConfig, given: Iterable[str] | None
    ) -> tuple[ModelConfig, TrainConfig, set[str]]:
        """The settings of this run: fresh, or resumed (the saved ones, with what the caller gave applied),
        a budget, and whether --size auto chooses the shape; the counters and the budget's clock."""
        given_train = given_fields(cfg, given)
        given_model = given_fields(model_cfg, given)
        start = (
            resume_start(self.run, model_cfg, cfg, given_train, given_model)
            if cfg.resume
            else fresh_start(self.run, model_cfg, cfg)
        )
        model_cfg, cfg = start.model_cfg, start.cfg
        self.init_tok, self.tokenizer_trained_here = start.init_tok, start.tokenizer_trained_here
        self.saved_cfg, self.saved_data = start.saved_cfg, start.saved_data
        self.notes = start.notes  # what a resume changed, said once the log is set up
        # (kind, message) of a resume, written once the run directory is open
        self.pending_events: list[tuple[str, str]] = []
        unset = TrainConfig()
        # e.g. max_time="0" (the CLI checks typed flags)
        check_budgets(cfg, {b for b in given_train if getattr(cfg, b) != getattr(unset, b)})
        if not any(getattr(cfg, b) for b in BUDGETS):
            cfg.max_steps = DEFAULT_STEPS
            self.notes.append(
                f"no budget given: training for {DEFAULT_STEPS} steps, the default (set --max-steps, --max-tokens, "
                "--max-time or --max-epochs)"
            )
        # --size auto: the default for a new run given no model-shape flag (or asked for with --size auto)
        self.auto = (
            not cfg.resume
            and not cfg.init
            and cfg.size == "auto"
            and ("size" in given_train or not given_model & set(autosize.MODEL_KEYS))
        )
        self.fixed = {k: getattr(model_cfg, k) for k in given_model & {*autosize.MODEL_KEYS, "dropout"}}
        self.fixed.update({k: getattr(cfg, k) for k in given_train & set(autosize.TRAIN_KEYS)})
        self.cfg, self.out, self.given = cfg, self.run.path, given_train  # the settings the caller chose
        self.state = TrainState()  # the counters (resume.py): read here as self.step, self.best_val, ...
        self.budget = Budget(cfg, lambda: (self.step, self.tokens_seen, self.epochs_done()))
        return model_cfg, cfg, given_train

    def _place(self, cfg: TrainConfig, log) -> None:
        """Where the run computes, and its log."""
        # Device, compute dtype and compilation, decided once from the flags and the machine (gradlm/runtime.py):
        # bf16 autocast where the device multiplies bf16 natively, decided from its features so every resume
        # and every rank agrees; weights and optimizer state stay fp32. Validation computes in the same dtype.
        self.rt = runtime.resolve(cfg.device, cfg.dtype, cfg.compile, budget_s=self.budget.max_time_s or None)
        self.device, self.compute_dtype, self.autocast = self.rt.device, self.rt.dtype, self.rt.autocast
        if self.rt.compile:
            # inductor's compiled graphs kept in $GRADLM_CACHE/inductor (use_cache sees past the /tmp default torch
            # writes into TORCHINDUCTOR_CACHE_DIR on importing dynamo or on torch.optim's first step)
            use_cache()
        self.dd = init_distributed(self.device)
        if self.rt.kind == "cuda":
            torch.cuda.set_device(self.device)
            runtime.set_fast_matmul(self.device)
        self.log = log or (lambda msg: _log(self.dd, msg))

    # -- data: rank 0 prepares (and caches); the other ranks then read the same cache

    def load_data(self, model_cfg: ModelConfig) -> TextData:
        """Hook: the training and validation data (with its tokenizer); sets model_cfg's vocabulary."""
        cfg, dd = self.cfg, self.dd
        trained = self.tokenizer_trained_here if self.cfg.resume else None
        saved = self.saved_data if cfg.resume else {}
        # a resume reads its own tokens, offline
        where = dict(identity=saved.get("identity", ""), hint=saved.get("path", ""))
        data = resolve_data(cfg, self.init_tok, self.log, trained, **where) if dd.main else None
        if dd.world > 1:
            dist.barrier()
            data = data or resolve_data(cfg, self.init_tok, self.log, trained, **where)
        tok = data.tokenizer
        if self.init_tok is not None and self.init_tok.sha256 != tok.sha256:
            raise ConfigError(
                f"{cfg.data} was tokenised with another tokenizer than {cfg.init or cfg.out}; pass raw text so it is "
                "tokenised with the run's tokenizer"
            )
        if self.init_tok is None:
            model_cfg.vocab_size = tok.vocab_size
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model only {model_cfg.vocab_size}")
        trained_here = self.tokenizer_trained_here if cfg.resume else self.init_tok is None
        return TextData(data, cfg, trained_here)

    def _auto_size(self) -> None:
        """--size auto: choose the shape, batch, learning rate, warmup, dropout and evaluation cadence for the
        budget, the corpus and this machine's measured speed (gradlm/training/autosize.py); the settings the caller
        gave are kept. Rank 0 chooses and every other rank takes its choice (probes could differ by rank)."""
        cfg, m = self.cfg, self.model_cfg
        seconds = self.budget.max_time_s
        budget = autosize.Allowance(
            seconds=seconds,
            tokens=cfg.max_tokens or int(cfg.max_epochs * len(self.source.train_tokens)),
            steps=cfg.max_steps,
        )
        shortest = min(len(self.source.train_tokens), len(self.source.val_tokens)) - 1
        tokens = self.source.train_tokens

        def sample(batch: int, block: int):
            starts = torch.randint(0, len(tokens) - block, (batch,), generator=torch.Generator().manual_seed(0))
            return self.rt.to_device(*windows(tokens, starts, block))

        probe = autosize.Probe(sample, self.autocast, self.device, limit_s=0.05 * seconds) if seconds else None
        speed = probe
        if probe is not None and self.rt.compile:
            # Compiling: the probe times eager steps, so the chooser counts the measured speed-up and a budget
            # shortened by the compile's measured time (runtime.COMPILE_COST).
            compile_s, speedup = runtime.compile_cost(self.device, self.compute_dtype)
            budget = dataclasses.replace(budget, seconds=max(seconds - compile_s, 0.5 * seconds))
            speed = lambda cfg, batch, dropout=0.0: probe(cfg, batch, dropout) * speedup  # noqa: E731
        t0 = time.time()
        choice = (
            autosize.choose(budget, len(tokens), speed, m.vocab_size, self.fixed, max_block=max(shortest, 2))
            if self.dd.main
            else None
        )
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
        compiled = (
            " (compiled: the probe's eager speed x{1:.2f}, {0:.0f} s of the budget left to compiling)".format(
                *runtime.compile_cost(self.device, self.compute_dtype)
            )
            if probe and self.rt.compile
            else ""
        )
        self.log(
            choice.reason
            + compiled
            + (f" (probe {probe_s:.1f} s, apart from the budget like data preparation)" if probe else "")
        )
        self.config_extra["size"] = {
            "reason": choice.reason,
            "probe_s": round(probe_s, 2),
            "tokens_per_param": autosize.TOKENS_PER_PARAM,
        }

    # -- model, optimizer, sampler, batch geometry

    def _build(self) -> None:
        cfg, dd, block = self.cfg, self.dd, self.block
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_cfg)
        self.model.reset_parameters(seed=cfg.seed)
        if cfg.init and not self.restoring:
            RunDir(cfg.init).load_weights_into(self.model)
            self.log(f"initialised from {cfg.init}")
        self.adapt_model()
        self.model.to(self.device)
        self.opt = build_optimizer(
            self.model,
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            cfg.momentum,
            (cfg.beta1, cfg.beta2),
            muon_lr=cfg.muon_lr,
            # one kernel for every update (AdamW's update 3.7x faster on a 2-core CPU: docs/benchmarks.md)
            fused=self.rt.kind in ("cuda", "cpu"),
        )
        self.full_batch = cfg.batch == "full"
        self.sampler_kind = self.source.sampler_kind(self.full_batch)
        # masked: targets hold -1 (see gradients())
        self.sampler, self.masked_targets = self.source.sampler(self.sampler_kind, block)
        if self.full_batch:  # batch gradient descent: all windows, accumulated, per update
            self.micro = cfg.micro_batch or FULL_BATCH_MICRO
            self.batch = self.sampler.n_windows
        else:
            self.micro = cfg.micro_batch or int(cfg.batch)
            self.batch = int(cfg.batch) * cfg.accum
        self.accum = math.ceil(self.batch / self.micro)
        if self.micro % dd.world:
            raise ConfigError(
                f"the micro-batch ({self.micro}) must divide evenly over {dd.world} processes; set --micro-batch to a "
                f"multiple of {dd.world}"
            )
        self.step_tokens = self.batch * block
        self._compile_if_warm()
        # The compiled model (when compiling) serves the step, and the evaluation on CUDA (see evaluate); DDP wraps it
        # for the step.
        self.fast_model = torch.compile(self.model) if self.rt.compile else self.model
        self._wrap_for_ranks()
        # for bits per byte
        self.byte_lengths = torch.tensor(self.tok.token_byte_lengths(), dtype=torch.long, device=self.device)

    def compile_key(self) -> list:
        """What the compiled training step's graphs depend on (with compiling.machine_key): the model's shape and the
        parameters that train (adapters, frozen layers), the batches' kind (fine-tuning pads its own lengths), the
        micro-batch and context, the compute dtype and the number of processes (DDP splits the graph)."""
        trained = hashlib.sha256(
            " ".join(n for n, p in self.model.named_parameters() if p.requires_grad).encode()
        ).hexdigest()[:16]
        data = [type(self).__name__, self.sampler_kind, self.masked_targets]
        return ["training step", self.model_cfg.to_dict(), trained, data, self.micro, self.block, self.compute_dtype,
                self.dd.world]  # fmt: skip

    def _compile_if_warm(self) -> None:
        """--compile auto on the CPU: a run the rule left uncompiled (a budget too short to repay an empty cache's
        compile) compiles after all when this shape's step was compiled in this cache before, so that its graphs are
        read back in seconds, and the budget repays that (runtime.WARM_COMPILE_S, or the fastest warm compile's
        time). The choice is kept in config.json: a resumed run compiles exactly when its start did (compiled and
        eager steps round differently, and a resume is bit-exact)."""
        if self.rt.compile or self.cfg.compile != "auto" or self.rt.kind != "cpu" or not self.budget.max_time_s:
            return
        if self.cfg.resume:
            warm = bool(self.run.read_config().get("compile", {}).get("warm_cache"))
            why = "it did when the run started"
        else:
            seen = compiled_before(self.compile_key())
            seconds = seen or runtime.WARM_COMPILE_S
            warm = seen is not None and runtime.resolve_compile(
                "auto", self.device, self.budget.max_time_s, dtype=self.compute_dtype, compile_s=seconds
            )
            why = f"this shape compiled before (~{seconds:.0f} s to read it back)"
        if warm:
            self.rt = dataclasses.replace(self.rt, compile=True)
            self.config_extra["compile"] = {"warm_cache": True}
            cache = use_cache()  # (as _place does for a run that compiles from the start)
            self.notes.append(
                f"compiling the training step: {why}, its graphs are in {cache} (--compile off trains uncompiled)"
            )

    def _wrap_for_ranks(self) -> None:
        """run_model, what the step runs: the model (compiled when compiling), in DDP under torchrun."""
        self.run_model = self.fast_model
        if self.dd.world > 1:
            self.run_model = torch.nn.parallel.DistributedDataParallel(
                self.run_model, device_ids=[self.dd.local_rank] if self.device.startswith("cuda") else None
            )

    def uncompile(self, error: Exception) -> bool:
        """--compile auto chose to compile and the compiler failed (before the graph ran): train uncompiled from here,
        after one warning line, and say True. False where compiling was asked for (--compile on) or the error is not
        the compiler's: the caller raises it."""
        if not (self.rt.compile and self.cfg.compile == "auto" and compiler_failed(error)):
            return False
        self.log(
            f"warning: compiling the training step failed ({cause(error)}); training goes on without "
            "compiling (--compile off skips the attempt)"
        )
        self.rt = dataclasses.replace(self.rt, compile=False)
        self.fast_model = self.model
        self._wrap_for_ranks()
        return True

    # -- the other hooks (see the class docstring)

    def adapt_model(self) -> None:
        """Change the model after its weights are loaded and before the optimizer sees it (freeze layers,
        add adapters): the optimizer takes only parameters that require gradients."""

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint saves (all weights; a LoRA run saves its adapter only)."""
        return self.model.state_dict()

    def restore_weights(self, best: bool) -> None:
        """Load the checkpoint's weights (written by checkpoint_weights) into the model."""
        self.run.load_weights_into(self.model, best=best)

    def eval_windows(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches validation scores: "val", or a "train" probe (this rank's share; from the data)."""
        return self.source.eval_windows(split, self.block, self.micro, self.dd)

    def steps_per_epoch(self) -> float:
        """Updates in one pass over the training data."""
        return self.source.steps_per_epoch(self.batch, self.block)

    def sample_prompt_ids(self) -> list[int]:
        """The fixed prompt of the samples written at every evaluation (from the data)."""
        return self.source.sample_prompt_ids(self.block)

    def stamp(self) -> dict:
        """Where the run is, as every row of metrics.jsonl and samples.jsonl begins: step, tokens, wall time."""
        return {"step": self.step, "tokens": self.tokens_seen, "time": round(self.budget.elapsed, 3)}

    def event(self, kind: str, message: str, log: bool = True, **extra) -> None:
        """Something happened to the run (a guard restore, overfitting, early stopping, a resume, a budget
        extension, the stop): log the message (unless said otherwise) and write it to metrics.jsonl as an event row."""
        if log:
            self.log(message)
        self.metrics.write(**self.stamp(), event=kind, message=message, **extra)

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
            x, y = self.rt.to_device(x, y)  # pinned and non-blocking on CUDA
            sync = dd.world == 1 or k == self.accum - 1
            with nullcontext() if sync else self.run_model.no_sync(), self.autocast():
                noise = self.dropout_noise(x)
                try:
                    loss = self.run_model(x, y, **noise)
                except Exception as e:  # noqa: BLE001  (a compile that auto chose and failed: the same batch, eagerly)
                    if not self.uncompile(e):
                        raise
                    loss = self.run_model(x, y, **noise)
                (loss * share).backward()
            loss_sum += loss.detach() * share
        if dd.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= dd.world
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss, norm = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()  # the step's one read to the host
        return loss, norm

    def dropout_noise(self, x: torch.Tensor) -> dict:
        """A compiled step on the CPU with dropout: the forward's random bytes, drawn here in one call ({"noise": ...},
        for the model's forward), so the graph takes them as an input instead of breaking at each dropout to draw
        them. Under bf16 autocast they are the bytes an uncompiled step draws one dropout at a time (the same masks).
        Otherwise nothing: each dropout draws its own."""
        if not (self.rt.compile and self.rt.kind == "cpu" and self.model_cfg.dropout > 0):
            return {}
        return {"noise": random_bytes(self.model.dropout_bytes(*x.shape))}

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
                    # the global micro-batch's positions, alike on every rank
                    yield x, y, self.sampler.last_rows * self.block

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

    def epochs_done(self) -> float:
        return self.sampler.epochs_done if self.sampler_kind == "epoch" else self.source.epochs(self.tokens_seen)

    # -- evaluation and state

    def evaluate(self) -> dict:
        """Validation loss and bits per byte, and the loss on a probe of the training data (for the gap),
        through the one scorer in the run's compute dtype; every rank scores its share of the windows.
        On the CPU the evaluation runs uncompiled even when the step is compiled: compiling it took 23 s for 1.75 ->
        1.15 s an evaluation (5 x 224, bf16), repaid only after ~38 evaluations, where a run makes about ten."""
        model = self.model if self.rt.kind == "cpu" else self.fast_model
        val, train = (
            score(
                model,
                self.eval_windows(split),
                self.byte_lengths,
                self.compute_dtype,
                distributed=self.dd.world > 1,
            )
            for split in ("val", "train")
        )
        return {"val_loss": val.loss, "val_bpb": val.bits_per_byte, "train_eval_loss": train.loss}

    def snapshot(self) -> dict:
        """The state the divergence guard comes back to (in memory; not a --snapshots file)."""
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "path_at": self.state.path_at,
        }

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
        self.step, self.tokens_seen, self.state.path_at = snap["step"], snap["tokens_seen"], snap["path_at"]
        if self.dd.main:  # the path's snapshots past this step were of the steps undone
            self.run.drop_snapshots(after=self.step)

    def record_path(self) -> None:
        """--snapshots N: after a step, save the weights (what a checkpoint keeps) to RUN/snapshots/ when the
        run has passed the next of N points evenly spaced over its budget (TrainState.snapshot_due)."""
        if self.state.snapshot_due(self.budget.progress(), self.cfg.snapshots) and self.dd.main:
            self.run.save_snapshot(self.checkpoint_weights(), self.step)

    def start_run_dir(self) -> None:
        """Create (or reopen) the run directory on rank 0: take the lock, write config.json (the settings
        really used), tokenizer.json, and a fresh or trimmed metrics.jsonl."""
        if not self.dd.main:
            return
        made = not self.out.exists()
        self.run.acquire()
        until = -1
        if self.resumed:
            until = self.metrics.truncate_after(self.step)
            self.samples.truncate_after(self.step)
        else:
            if self.run.exists():  # another process made it between our check and the lock
                self.run.release()
                raise RunDirError(
                    f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
                )
            self.run.metrics.unlink(missing_ok=True)
            self.run.samples.unlink(missing_ok=True)
        self.run.drop_snapshots(after=self.step)  # those an interrupted run took after its checkpoint come again
        config = config_dict(
            self.model_cfg,
            asdict(self.cfg),
            self.source.summary(),
            **self.config_extra,
            params=self.model.num_params(),
            # what "auto" resolved to here
            runtime={"device": self.device, "dtype": self.compute_dtype},
        )
        try:
            self.open_trackers(config, until)
        except BaseException:  # a tracker that cannot start: nothing of a new run is left behind
            self.close_run_dir()
            if made:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        self.run.save_tokenizer(self.tok)
        ckpt.atomic_write_json(self.run.config, config)

    def open_trackers(self, config: dict, until: int) -> None:
        """--logger: every row of metrics.jsonl and samples.jsonl also goes to these trackers
        (gradlm/training/trackers.py)."""
        names = parse_loggers(self.cfg.logger)
        if not names:
            return
        history = (read_jsonl(self.run.metrics), read_jsonl(self.run.samples)) if self.resumed else ([], [])
        self.trackers = Trackers(
            names, self.out, config, since=self.step if self.resumed else -1, until=until, history=history, log=self.log
        )
        self.metrics.listener, self.samples.listener = self.trackers.metrics_row, self.trackers.sample_row

    def close_trackers(self, ok: bool) -> None:
        if self.trackers is not None:
            self.metrics.listener = self.samples.listener = None
            self.trackers.close(ok)
            self.trackers = None

    def close_run_dir(self) -> None:
        if getattr(self, "trackers", None) is not None:  # a run that failed before its loop finished
            self.close_trackers(ok=False)
        if getattr(self, "run", None) is not None:
            self.run.release()

    def save(self) -> None:
        """Checkpoint (rank 0): the training state and the weights, as one pair (see gradlm.rundir)."""
        if not self.dd.main:
            return
        self.saved_step = self.step
        self.run.save_checkpoint(checkpoint_state(self), self.checkpoint_weights(), self.step)

    def describe(self) -> str:
        return self.source.describe(self)


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


# ---- train() and the loop -------------------------------------------------------------------------------


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, on_step=None, given: Iterable[str] | None = None, on_eval=None
) -> dict:
    """Train a model as configured; returns a summary (final validation loss, bits per byte, steps, ...).
    The caller's configurations are left as they were (the Trainer works on copies).

    on_step(step, loss, lr) is called after every update. on_eval(step, progress, evaluation) after every
    evaluation (progress: the share of the budget spent, 0-1; evaluation: val_loss, val_bpb, ...): True stops the
    run there, saved, with stop reason "pruned" (gradlm sweep prunes hopeless trials so). given names the
    settings the caller chose (the CLI passes the flags typed); on resume only those override the run's
    saved settings. None means: every field that differs from its default.

    Example:
        >>> cfg = TrainConfig(data="notes.txt", out="runs/notes", max_time="2m")
        >>> train(ModelConfig(n_layer=2), cfg)  # doctest: +SKIP
    """
    return run(Trainer(model_cfg, cfg, given=given).build(), on_step, on_eval)


def run(t: Trainer, on_step=None, on_eval=None) -> dict:
    """Train t until its budget is spent, it converges, it is paused (--pause-at) or a signal stops it;
    returns the summary. Writes the run directory (config, checkpoints, metrics, summary, plots) and
    closes it. Pretraining (train) and fine-tuning (gradlm/training/finetune.py) both run here."""
    t.build()
    t.start_run_dir()
    try:
        return _loop(t, on_step, on_eval)
    except (Diverged, Interrupted):  # they wrote their own "stopped" event
        raise
    except BaseException as e:  # a crash, a second Ctrl-C: the run's record says it stopped, and why
        if t.dd.main:
            why = (
                "a second signal stopped it at once" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            )
            t.event(
                "stopped",
                f"stopped at step {t.step}: {why}; the last checkpoint is step {max(t.saved_step, 0)}",
                log=False,
                reason="error",
            )
        raise
    finally:
        t.close_run_dir()
        # Under torchrun, drop the DDP wrapper now: its reducer holds gloo work objects, and freed only at
        # interpreter shutdown they abort the process ("terminate called without an active exception").
        t.run_model = t.model


def _loop(t: Trainer, on_step, on_eval) -> dict:
    cfg, budget = t.cfg, t.budget
    for note in t.notes:
        t.log(note)
    for kind, message in t.pending_events:  # a resume, a budget extension: also events on the curves (gradlm watch)
        t.event(kind, message, log=False)  # logged with the notes
    guard, show = DivergenceGuard(t), TrainLog(t)
    t.log(t.describe())
    t.model.train()
    stop_reason = ""
    watch = CompileWatch(t.log) if t.rt.compile else None  # --compile: each compile said once, with its time
    compile_s = 0.0  # the training step's compiles, noted in the cache for the next run of the shape
    budget.start_clock()
    with StopSignals() as signals:
        while True:
            if budget.progress() >= 1:
                stop_reason = "budget"
                break
            if cfg.pause_at and t.step >= cfg.pause_at:
                stop_reason = "paused"
                break
            if signals.requested(t.dd, t.rt):
                stop_reason = "interrupted"
                break
            # ---- one step of gradient descent
            t0 = time.time()
            budget.last_factor = budget.lr_factor()
            lrs = set_lr(t.opt, budget.last_factor)  # lr = base_lr * schedule(progress)
            loss, grad_norm = t.gradients()  # forward + backward over the step's micro-batches, clipped
            compiled = watch is not None and watch.after(f"the training step (step {t.step + 1})", time.time() - t0)
            compile_s += (time.time() - t0) if compiled else 0.0
            if not guard.observe(loss, grad_norm):  # overshot: the guard restored the last good state, lr halved
                continue
            t.update()  # the gradient-descent update
            # the pace (not from a step that compiled), and the final evaluation's reserve
            budget.stepped(time.time() - t0, cfg.eval_tokens, t.step_tokens, paced=not compiled)
            budget.tick(t.dd.world, t.device)
            if on_step is not None:
                on_step(t.step, loss, lrs["lr"])
            show.step(loss, grad_norm, lrs)
            t.record_path()  # --snapshots: before this step's checkpoint, which records it as taken
            # ---- every --eval-every steps, and at the end: validation, checkpoint, early stopping
            done = budget.progress() >= 1 or (cfg.pause_at and t.step >= cfg.pause_at)
            if t.step % cfg.eval_every == 0 or done:
                t0 = time.time()
                converged = evaluate_and_checkpoint(t, show)
                if not (watch is not None and watch.after("the evaluation", time.time() - t0)):
                    budget.evaluated(time.time() - t0)  # the final evaluation's cost (unless this one compiled)
                budget.tick(t.dd.world, t.device)
                if converged:
                    stop_reason = "converged"
                    break
                guard.mark_good(show.last_eval["val_loss"])
                if on_eval is not None and not done and on_eval(t.step, budget.progress(), show.last_eval):
                    stop_reason = "pruned"
                    break
    show.close()
    if compile_s and t.dd.main:
        remember_compile(t.compile_key(), compile_s)  # a later run of this shape finds its graphs (_compile_if_warm)
    return _finish(t, show, stop_reason, signals.signum)


def _finish(t: Trainer, show: TrainLog, stop_reason: str, signum: int) -> dict:
    """The final evaluation and checkpoint (unless the last step had them), the summary and the plots."""
    budget, out = t.budget, t.out
    if not show.last_eval:
        show.last_eval = t.evaluate()
    if t.saved_step != t.step:
        t.save()
    budget.tick(t.dd.world, t.device)
    summary = {
        "run": str(out),
        "steps": t.step,
        "tokens": t.tokens_seen,
        "epochs": t.epochs_done(),
        "time_s": budget.elapsed,
        "train_time_s": budget.train_time,
        "tokens_per_s": t.tokens_seen / budget.train_time if budget.train_time else 0.0,
        "dtype": t.compute_dtype,
        "stop": stop_reason,
        "best_val_loss": t.best_val,
        "divergence_restarts": t.guard_used,
        **show.last_eval,
        **t.report,
    }
    why = {
        "budget": "its budget is spent",
        "converged": "it converged (early stopping)",
        "paused": f"--pause-at {t.cfg.pause_at}",
        "pruned": "the sweep pruned it (behind the other trials at this point of the budget)",
        "interrupted": f"{signal.Signals(signum).name if signum else 'a signal'}: continue with `gradlm {t.command} "
        f"--out {out} --resume`",
    }.get(stop_reason, stop_reason)
    t.event("stopped", f"stopped at step {t.step}: {why}", log=False, reason=stop_reason)
    if t.dd.main:
        t.run.write_summary(summary)
        if t.cfg.plots:
            t.run.write_training_plot()
            if t.trackers is not None:
                t.trackers.images(t.step, sorted(t.run.training_plot.parent.glob("*.png")))
    t.close_trackers(ok=stop_reason != "interrupted")
    if stop_reason == "interrupted":
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{name}: stopped at step {t.step} and saved a checkpoint in {out}; continue with `gradlm {t.command} "
            f"--out {out} --resume`",
            128 + signum,
        )
    return summary
