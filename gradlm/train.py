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
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gradlm import checkpoint as ckpt
from gradlm import datasets
from gradlm.data import EpochSampler, locate, RandomSampler, TokenData, prepare, read_documents, windows
from gradlm.errors import ConfigError, GradlmError, RunDirError
from gradlm.model import GPT, ModelConfig
from gradlm.optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_factor, scale_base_lr, set_lr
from gradlm.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """How to train. Saved as the "train" section of a run's config.json."""

    data: str = field(default="shakespeare", metadata={"help": "raw text (file, directory, .jsonl, .gz, or a registered name such as shakespeare) or a `gradlm prepare` directory"})
    out: str = field(default="runs/default", metadata={"help": "run directory to write"})
    vocab_size: int = field(default=1024, metadata={"help": "tokenizer size (bytes + merges) when --data is raw text; 256 = pure bytes"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the text held out for validation"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl input"})
    batch: str = field(default="32", metadata={"help": "windows per update: N (mini-batch), 1 (stochastic GD) or full (batch GD: one update per epoch)"})
    micro_batch: int = field(default=0, metadata={"help": "windows per forward pass; 0 = the whole batch (or 32 with --batch full)"})
    accum: int = field(default=1, metadata={"help": "gradient accumulation: micro-batches summed into one update"})
    sampler: str = field(default="auto", metadata={"help": "random (windows at random offsets) or epoch (every window once per epoch, seeded order); auto = epoch for --batch full"})
    optimizer: str = field(default="adamw", metadata={"help": "sgd, momentum, nesterov, adamw or muon"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (for muon: of its AdamW part); 0 = the optimizer's default: sgd 0.3, momentum/nesterov 0.05, adamw/muon 3e-3"})
    muon_lr: float = field(default=0.02, metadata={"help": "learning rate of Muon's matrix updates"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices (a regulariser)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum for --optimizer momentum/nesterov"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule: constant, cosine, linear or wsd"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of the budget spent decaying"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many updates (0 = no limit)"})
    max_time: str = field(default="", metadata={"help": "stop after this much training time, e.g. 90s, 5m, 1h"})
    max_tokens: int = field(default=0, metadata={"help": "stop after this many training tokens"})
    max_epochs: float = field(default=0.0, metadata={"help": "stop after this many passes over the training set"})
    pause_at: int = field(default=0, metadata={"help": "save and stop at this step without ending the schedule; continue with --resume"})
    eval_every: int = field(default=50, metadata={"help": "evaluate (and checkpoint) every N steps"})
    eval_tokens: int = field(default=32768, metadata={"help": "validation tokens per evaluation"})
    patience: int = field(default=0, metadata={"help": "early stopping: stop after N evaluations without improvement (0 = off)"})
    min_delta: float = field(default=0.0, metadata={"help": "improvement in validation loss that counts for --patience"})
    guard_retries: int = field(default=8, metadata={"help": "divergence guard: times to restore the last good state and halve the lr before giving up"})
    seed: int = field(default=1337, metadata={"help": "fixes initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA)"})
    log_every: int = field(default=10, metadata={"help": "log the training loss every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    init: str = field(default="", metadata={"help": "start from the weights (and tokenizer) of this run directory: fine-tuning / transfer learning"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on a terminal"})
    plots: bool = field(default=True, metadata={"help": "draw loss, learning-rate and gradient-norm curves into plots/ at the end"})

    def validate(self) -> None:
        problems = []
        if self.batch != "full" and not (self.batch.isdigit() and int(self.batch) >= 1):
            problems.append(f"--batch must be a positive integer or 'full', got {self.batch!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.sampler not in ("auto", "random", "epoch"):
            problems.append(f"--sampler must be auto, random or epoch, got {self.sampler!r}")
        if self.batch == "full" and self.sampler == "random":
            problems.append("--batch full visits every window once per update, so it needs --sampler epoch (or auto)")
        for name in ("lr", "muon_lr"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)) or (name == "muon_lr" and v == 0):
                problems.append(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        for name in ("accum", "eval_every", "eval_tokens", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_epochs", "warmup_steps", "patience", "guard_retries", "micro_batch", "pause_at", "weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        try:
            parse_duration(self.max_time)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resumed_config(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
    """The settings to resume with: the run's own, except those the caller changed from the defaults
    (typically a longer budget), so `gradlm train --out runs/x --resume --max-time 10m` just works."""
    defaults = TrainConfig()
    merged = {f.name: getattr(given, f.name) if getattr(given, f.name) != getattr(defaults, f.name) else getattr(saved, f.name) for f in fields(TrainConfig)}
    merged.update(out=given.out, resume=True, pause_at=given.pause_at)
    return TrainConfig(**merged)


def parse_duration(text: str) -> float:
    """'90s' -> 90.0, '5m' -> 300.0, '1.5h' -> 5400.0, '' -> 0 (no limit), '120' -> 120 seconds."""
    if not text:
        return 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
    if not m:
        raise ConfigError(f"--max-time {text!r} is not a duration; write e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m.group(2)]


# ---- data --------------------------------------------------------------------------------------------


def _source_key(sources: list[str], extra: dict) -> str:
    """Cache key of raw text: paths, sizes and modification times of every file, plus the settings."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for s in sources:
        p = locate(s)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_data(cfg: TrainConfig, tokenizer: Tokenizer | None = None, log=print) -> TokenData:
    """A prepared directory as it is, or raw text tokenised (and the tokenizer trained) once and cached."""
    p = Path(cfg.data)
    if p.is_dir() and (p / "meta.json").is_file():
        return TokenData(p)
    sources = [cfg.data]
    key = _source_key(sources, {"vocab": cfg.vocab_size, "val": cfg.val_fraction, "field": cfg.text_field, "tok": tokenizer.sha256 if tokenizer else None})
    cached = datasets.cache_dir() / "prepared" / key
    if (cached / "meta.json").is_file():
        return TokenData(cached)
    docs = read_documents(sources, cfg.text_field)
    if tokenizer is None:
        t0 = time.time()
        tokenizer = Tokenizer.train((d.text for d in docs), cfg.vocab_size, length=len(docs))
        log(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.time() - t0:.1f}s")
    t0 = time.time()
    meta = prepare(sources, tokenizer, cached, cfg.val_fraction, seed=0, text_field=cfg.text_field, progress=cfg.progress and sys.stderr.isatty(), docs=docs)
    log(f"tokenised {meta['splits']['train']['tokens']:,} train + {meta['splits']['val']['tokens']:,} val tokens in {time.time() - t0:.1f}s (cached in {cached})")
    return TokenData(cached)


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
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, token count, bpb loss sum, bytes
    for i in range(0, len(starts), batch):
        x, y = windows(tokens, starts[i : i + batch].tolist(), block)
        x, y = x.to(device), y.to(device)
        with autocast():
            loss = model(x, y, reduction="none").double()  # (B, T)
        nbytes = byte_lengths[y].double()
        sums += torch.stack([loss.sum(), torch.tensor(loss.numel(), device=device, dtype=torch.float64), (loss * (nbytes > 0)).sum(), nbytes.sum()])
    if dd.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    bpb = (sums[2] / math.log(2) / sums[3]).item() if sums[3] > 0 else float("nan")
    return {"loss": loss, "bpb": bpb, "tokens": int(sums[1].item())}


# ---- the run -----------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl: one JSON object per logged step or evaluation, flushed as written."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        ckpt.atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no metrics.jsonl; is it a gradlm run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _log(dd: Dist, msg: str) -> None:
    if dd.main:
        tqdm.write(msg, file=sys.stderr)


DEFAULT_LR = {"sgd": 0.3, "momentum": 0.05, "nesterov": 0.05, "adamw": 3e-3, "muon": 3e-3}


class Trainer:
    """Everything one run holds: data, model, optimizer, sampler, batch geometry and counters.

    `gradients()` runs one step's forward and backward passes over its micro-batches and clips the
    gradient; `update()` applies the optimizer step. train() loops over these; the LR finder reuses
    them with learning rates of its own.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, log=None):
        problems = []
        for c in (cfg, model_cfg):  # report every problem of both configurations at once, before any work
            try:
                c.validate()
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))
        if not cfg.lr:
            cfg.lr = DEFAULT_LR[cfg.optimizer]
        if cfg.resume and (Path(cfg.out) / "config.json").is_file():
            cfg = resumed_config(TrainConfig.from_dict(ckpt.read_json(Path(cfg.out) / "config.json", "run config")["train"]), cfg)
            cfg.validate()
        if not (cfg.max_steps or cfg.max_time or cfg.max_tokens or cfg.max_epochs):
            cfg.max_steps = 1000
        self.cfg, self.out = cfg, Path(cfg.out)
        self.max_time_s = parse_duration(cfg.max_time)
        self.dd = init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = pick_device(cfg, self.dd)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        self.log = log or (lambda msg: _log(self.dd, msg))
        out = self.out

        # -- where the run starts from: a fresh model, a checkpoint to resume, or another run's weights
        resume_state, init_tok = None, None
        if cfg.resume:
            if not (out / "config.json").is_file():
                raise RunDirError(f"cannot resume: {out} is not a run directory (no config.json); drop --resume to start it")
            model_cfg = ModelConfig.from_dict(ckpt.read_json(out / "config.json", "run config")["model"])
            resume_state = ckpt.load_torch(out / "state" / "trainer.pt")
            init_tok = Tokenizer.load(out / "tokenizer.json")
        else:
            if (out / "config.json").exists():
                raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            if out.is_file():
                raise RunDirError(f"--out {out} is a file; give a directory")
            if cfg.init:
                init_dir = Path(cfg.init)
                if not (init_dir / "config.json").is_file():
                    raise RunDirError(f"--init {init_dir} is not a run directory (no config.json)")
                dropout = model_cfg.dropout
                model_cfg = ModelConfig.from_dict(ckpt.read_json(init_dir / "config.json", "run config")["model"])
                model_cfg.dropout = dropout
                init_tok = Tokenizer.load(init_dir / "tokenizer.json")

        # -- data: rank 0 prepares (and caches); the other ranks then read the same cache
        dd = self.dd
        data = resolve_data(cfg, init_tok, self.log) if dd.main else None
        if dd.world > 1:
            dist.barrier()
            data = data or resolve_data(cfg, init_tok, self.log)
        self.data, self.tok = data, data.tokenizer
        if init_tok is not None and init_tok.sha256 != self.tok.sha256:
            raise ConfigError(f"{cfg.data} was tokenised with another tokenizer than {cfg.init or cfg.out}; pass raw text so it is tokenised with the run's tokenizer")
        if init_tok is None:
            model_cfg.vocab_size = self.tok.vocab_size
        if self.tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tok.vocab_size} ids but the model only {model_cfg.vocab_size}")
        self.model_cfg = model_cfg
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")
        block = self.block = model_cfg.block_size
        for name, toks, fix in (("training", self.train_tokens, "add text"), ("validation", self.val_tokens, "raise --val-fraction or add text")):
            if len(toks) < block + 1:
                raise ConfigError(f"the {name} split has {len(toks):,} tokens, fewer than the context window + 1 ({block + 1}); lower --block-size or {fix}")

        # -- model, optimizer, sampler
        torch.manual_seed(cfg.seed)
        self.model = GPT(model_cfg)
        self.model.reset_parameters(seed=cfg.seed)
        if cfg.init and not cfg.resume:
            load_weights_into(self.model, Path(cfg.init) / "model.safetensors")
            self.log(f"initialised from {cfg.init}")
        self.model.to(self.device)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.startswith("cuda"))
        self.autocast = (lambda: torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.opt = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, (cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)
        self.full_batch = cfg.batch == "full"
        self.sampler_kind = "epoch" if self.full_batch or cfg.sampler == "epoch" else "random"
        self.sampler = (EpochSampler if self.sampler_kind == "epoch" else RandomSampler)(self.train_tokens, block, cfg.seed)
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

        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.best_val, self.bad_evals, self.guard_used = float("inf"), 0, 0
        self.gap_history: list[float] = []
        if resume_state is not None:
            load_weights_into(self.model, out / "model.safetensors")
            self.opt.load_state_dict(resume_state["optimizer"])
            self.sampler.load_state_dict(resume_state["sampler"])
            torch.set_rng_state(resume_state["torch_rng"])
            for k in ("step", "tokens_seen", "elapsed", "best_val", "bad_evals", "guard_used", "gap_history"):
                setattr(self, k, resume_state[k])
            self.log(f"resumed {out} at step {self.step}")
        self.resumed = resume_state is not None
        self.metrics = Metrics(out / "metrics.jsonl", dd.main)

    # -- one step of gradient descent

    def gradients(self) -> tuple[float, float]:
        """Forward + backward over this step's micro-batches; returns (loss, gradient norm before clipping)."""
        dd = self.dd
        loss_sum = torch.zeros((), device=self.device)
        for k in range(self.accum):
            n = min(self.micro, self.sampler.n_windows - self.sampler.pos) if self.full_batch else min(self.micro, self.batch - k * self.micro)
            x, y = self.sampler.next(n)  # every rank draws the same global micro-batch, then takes its rows
            x, y = x[dd.rank :: dd.world].to(self.device), y[dd.rank :: dd.world].to(self.device)
            # This rank's rows' share of the step's tokens, times the world size because DDP averages
            # gradients over ranks: summed over ranks and micro-batches, the weights give the gradient
            # of the mean loss over the whole global batch (also when n does not split evenly).
            share = len(x) / self.batch * dd.world
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

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.step_tokens

    # -- progress, evaluation, state

    def epochs_done(self) -> float:
        return self.sampler.epochs_done if self.sampler_kind == "epoch" else self.tokens_seen / len(self.train_tokens)

    def progress(self) -> float:
        """Fraction of the budget spent: the largest of steps, tokens, time and epochs used."""
        cfg, parts = self.cfg, []
        if cfg.max_steps:
            parts.append(self.step / cfg.max_steps)
        if cfg.max_tokens:
            parts.append(self.tokens_seen / cfg.max_tokens)
        if self.max_time_s:
            parts.append(self.elapsed / self.max_time_s)
        if cfg.max_epochs:
            parts.append(self.epochs_done() / cfg.max_epochs)
        return max(parts) if parts else 0.0

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
        """Create the run directory (rank 0): config.json, tokenizer.json, a fresh or trimmed metrics.jsonl."""
        if not self.dd.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            self.metrics.truncate_after(self.step)
        else:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.tok.save(self.out / "tokenizer.json")
        ckpt.atomic_write_json(
            self.out / "config.json",
            {
                "model": self.model_cfg.to_dict(),
                "train": asdict(self.cfg),
                "data": {"path": str(self.data.path), "tokenizer_sha256": self.tok.sha256, "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens)},
                "gradlm_version": "0.1.0",
            },
        )

    def save(self, reason: str) -> None:
        """Checkpoint (rank 0). State first, weights last: the step in the weights' metadata names a
        complete checkpoint."""
        if not self.dd.main:
            return
        state = {k: getattr(self, k) for k in ("step", "tokens_seen", "elapsed", "best_val", "bad_evals", "guard_used", "gap_history")}
        state.update(optimizer=self.opt.state_dict(), sampler=self.sampler.state_dict(), torch_rng=torch.get_rng_state())
        ckpt.save_torch(self.out / "state" / "trainer.pt", state)
        ckpt.save_weights(self.out / "model.safetensors", self.model.state_dict(), {"step": str(self.step), "reason": reason})

    def describe(self) -> str:
        m, c = self.model, self.cfg
        return (
            f"model: {m.num_params():,} parameters ({m.num_params(True):,} non-embedding), {m.flops_per_token() / 1e6:.1f} MFLOP/token | "
            f"batch {'full' if self.full_batch else self.batch} = {self.step_tokens:,} tokens/step ({self.accum} x {self.micro} windows x {self.block} tokens) | "
            f"{c.optimizer}, lr {c.lr:g}, {c.schedule} | device {self.device}"
        )


def diverged(loss: float, grad_norm: float, ln_vocab: float, ema: float | None, step: int) -> bool:
    """A step overshot: the loss or gradient is not finite, the loss is far worse than knowing nothing
    (uniform guessing scores ln V), or it jumped to 3x its recent average."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return True
    return loss > 1.5 * ln_vocab or (ema is not None and step > 50 and loss > 3 * ema)


def overfitting(gaps: list[float], evals: int = 3, min_gap: float = 0.05) -> bool:
    """Validation loss minus training loss has grown at each of the last `evals` evaluations and is
    now material: the model is fitting its training text rather than the language (high variance)."""
    recent = gaps[-(evals + 1) :]
    return len(recent) == evals + 1 and all(b > a + 1e-3 for a, b in zip(recent, recent[1:])) and recent[-1] > min_gap


def train(model_cfg: ModelConfig, cfg: TrainConfig, on_step=None) -> dict:
    """Train a model as configured; returns a summary (final validation loss, bits per byte, steps, ...).

    on_step(step, loss, lr) is called after every update (the comparison lab uses it).

    Example:
        >>> train(ModelConfig(n_layer=2), TrainConfig(data="notes.txt", out="runs/notes", max_time="2m"))  # doctest: +SKIP
    """
    t = Trainer(model_cfg, cfg)
    cfg = t.cfg  # with defaults filled in (and, on --resume, the run's own settings)
    t.start_run_dir()
    dd, out, log = t.dd, t.out, t.log
    ln_vocab = math.log(t.model_cfg.vocab_size)
    good = t.snapshot()  # the last state known to be sane, for the divergence guard
    ema, last_eval, stop_reason = None, {}, ""
    # The bar counts percent of the budget (steps, tokens, time or epochs, whichever ends first), so its
    # rate and ETA hold for every kind of budget.
    bar = tqdm(
        total=100.0, initial=round(100 * t.progress(), 2), disable=not (cfg.progress and sys.stderr.isatty() and dd.main), dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    log(t.describe())
    t.model.train()
    t_last, tokens_last = time.time(), t.tokens_seen

    while True:
        if t.progress() >= 1:
            stop_reason = "budget"
            break
        if cfg.pause_at and t.step >= cfg.pause_at:
            stop_reason = "paused"
            break
        t0 = time.time()
        lr = set_lr(t.opt, lr_factor(t.progress(), t.step, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction))
        loss, gn = t.gradients()

        if diverged(loss, gn, ln_vocab, ema, t.step):
            # The divergence guard: back to the last good state with half the learning rate.
            t.opt.zero_grad(set_to_none=True)
            bad_step = t.step
            t.restore(good)
            if t.guard_used >= cfg.guard_retries:
                t.save("diverged")
                bar.close()
                raise GradlmError(
                    f"training diverged at step {bad_step} (loss {loss:.4g}, gradient norm {gn:.4g}) and the guard gave up "
                    f"after {t.guard_used} restarts with a halved learning rate; the last good state (step {t.step}) is saved in {out}. "
                    f"Try --lr {t.opt.param_groups[0]['base_lr'] / 2:.2g} or lower (see `gradlm lr-find`)"
                )
            t.guard_used += 1
            scale_base_lr(t.opt, 0.5)
            good = t.snapshot()
            ema = None
            new_lr = t.opt.param_groups[0]["base_lr"]
            log(f"divergence guard: step {bad_step} loss {loss:.4g} (grad norm {gn:.4g}); restored step {t.step}, lr halved to {new_lr:.3g} ({t.guard_used}/{cfg.guard_retries})")
            t.metrics.write(step=t.step, event="diverged", at_step=bad_step, loss=loss if math.isfinite(loss) else None, new_lr=new_lr)
            continue
        t.update()
        t.elapsed += time.time() - t0
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if on_step is not None:
            on_step(t.step, loss, lr)

        if t.step % cfg.log_every == 0 or t.step == 1:
            now = time.time()
            tps = (t.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, t.tokens_seen
            t.metrics.write(step=t.step, tokens=t.tokens_seen, time=round(t.elapsed, 3), epoch=round(t.epochs_done(), 4), lr=lr, loss=loss, grad_norm=gn, tokens_per_s=round(tps, 1))
            if bar.disable and cfg.progress:
                p = t.progress()
                eta = t.elapsed * (1 - p) / p if p > 0 else float("nan")
                log(f"step {t.step:>6} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gn:.3f} | {tps:,.0f} tok/s | {t.elapsed:.0f}s, eta {eta:.0f}s")
            bar.set_postfix(step=t.step, loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", val=f"{last_eval.get('val_loss', float('nan')):.3f}")
        bar.update(min(100.0, 100 * t.progress()) - bar.n)

        done = t.progress() >= 1 or (cfg.pause_at and t.step >= cfg.pause_at)
        if t.step % cfg.eval_every == 0 or done:
            last_eval = t.evaluate()
            if last_eval["val_loss"] < t.best_val - cfg.min_delta:
                t.best_val, t.bad_evals = last_eval["val_loss"], 0
                if dd.main:
                    ckpt.save_weights(out / "best.safetensors", t.model.state_dict(), {"step": str(t.step), "val_loss": str(t.best_val)})
            else:
                t.bad_evals += 1
            gap = last_eval["val_loss"] - last_eval["train_eval_loss"]
            t.gap_history.append(gap)
            t.metrics.write(step=t.step, tokens=t.tokens_seen, time=round(t.elapsed, 3), epoch=round(t.epochs_done(), 4), **last_eval, gap=gap)
            log(f"step {t.step:>6} | val loss {last_eval['val_loss']:.4f} | val bpb {last_eval['val_bpb']:.4f} | train loss {last_eval['train_eval_loss']:.4f}")
            if overfitting(t.gap_history):
                log(f"warning: the train/validation gap has grown for 3 evaluations ({t.gap_history[-4]:.3f} -> {gap:.3f}): the model is overfitting (high variance); consider --dropout, --weight-decay, --patience or more data")
            good = t.snapshot()
            t.save("eval")
            if cfg.patience and t.bad_evals >= cfg.patience:
                stop_reason = "converged"
                log(f"converged: validation loss has not improved by {cfg.min_delta} for {cfg.patience} evaluations (best {t.best_val:.4f}); best weights in {out / 'best.safetensors'}")
                break
    bar.close()
    if not last_eval:
        last_eval = t.evaluate()
    t.save(stop_reason)
    summary = {
        "run": str(out),
        "steps": t.step,
        "tokens": t.tokens_seen,
        "epochs": t.epochs_done(),
        "time_s": t.elapsed,
        "tokens_per_s": t.tokens_seen / t.elapsed if t.elapsed else 0.0,
        "stop": stop_reason,
        "best_val_loss": t.best_val,
        "divergence_restarts": t.guard_used,
        **last_eval,
    }
    if dd.main:
        ckpt.atomic_write_json(out / "summary.json", summary)
        if cfg.plots:
            from gradlm.plots import plot_runs

            plot_runs({out.name: read_metrics(out)}, out / "plots" / "training.png", title=str(out))
    return summary


def load_weights_into(model: GPT, path: Path) -> None:
    try:
        model.load_weights(ckpt.load_weights(path))
    except ValueError as e:
        raise RunDirError(f"{path} does not fit the model in config.json: {e}") from None


def load_model(run_dir: str | os.PathLike, best: bool = False, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """A trained model (in eval mode) and its tokenizer from a run directory."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"no run directory at {run}; train one with `gradlm train --out {run}`")
    cfg = ckpt.read_json(run / "config.json", "run config")
    if "model" not in cfg:
        raise RunDirError(f"{run / 'config.json'} has no model section; is {run} a gradlm run directory?")
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    load_weights_into(model, run / ("best.safetensors" if best else "model.safetensors"))
    model.to(device).eval()
    return model, Tokenizer.load(run / "tokenizer.json")

