"""Fine-tuning: start from a trained run and keep training it, on conversations or on more text.

    gradlm finetune runs/base --data qa.jsonl --out runs/qa --method lora --max-epochs 3

The data decides what is learned (ChatData here, or the trainer's TextData):
  chat .jsonl ("messages", or "prompt"/"completion" per line)   supervised fine-tuning (SFT): the loss
      covers only the assistant's tokens and each <|end|> (gradlm/text/sft.py), a seeded share of the
      conversations is held out and scored the same way for validation;
  raw text                                                      continued pretraining, as `train --init`.
The method decides what trains (Full, Freeze, Lora here; gradlm/model/lora.py):
  full     every weight;
  freeze   the top --train-top blocks, the final norm and the head;
  lora     low-rank adapters on --lora-targets; the run keeps only the adapter (adapter.safetensors)
           and refers to its base run, and every command that loads a run folds it in.

It is the gradient-descent loop of gradlm/training/trainer.py: FineTuner is a Trainer that hands its data questions
to a ChatData or TextData and what trains to a method object (no hook branches on either); validation
scores the held-out conversations with the one scorer (gradlm/model/scoring.py, on the replies only), so optimizers,
schedules, the divergence guard, early stopping, exact resume and plots all apply.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from gradlm import files as ckpt
from gradlm.text.chat import encode_chat
from gradlm.training.config import TrainConfig, given_fields
from gradlm.errors import ConfigError, RunDirError, flag
from gradlm.model.lora import (
    LORA_TARGETS,
    add_adapters,
    adapter_weights,
    count_params,
    freeze_below,
    load_adapter_weights,
    parse_targets,
)
from gradlm.model.transformer import ModelConfig
from gradlm.training.optim import base_lrs, state_floats
from gradlm.rundir import RunDir, config_dict, weights_step
from gradlm.text.sft import SFTSampler, batches, is_chat_file, load_sft, pad_id, split_examples
from gradlm.training.trainer import Trainer, run

METHODS = ("full", "freeze", "lora")


@dataclass
class FinetuneConfig:
    """What a fine-tune trains. Saved as the "finetune" section of the run's config.json."""

    method: str = field(
        default="full",
        metadata={
            "help": "full (every weight), freeze (only the top --train-top blocks + head) or lora (low-rank adapters)"
        },
    )
    train_top: int = field(
        default=1,
        metadata={
            "help": "--method freeze: train only the top N blocks, the final norm and the head (0 = the head only); "
            "every block below them is frozen"
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "--method lora: rank r of each adapter"})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "--method lora: the adapter's update is scaled by alpha / r"}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "--method lora: dropout on the adapters' input"})
    lora_targets: str = field(
        default=",".join(LORA_TARGETS),
        metadata={"help": "--method lora: comma-separated projections to adapt (or all)"},
    )

    def validate(self, given: Iterable[str] = ()) -> None:
        """Every problem at once; given names the settings the caller chose, so one that does not apply is refused."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.train_top < 0:
            problems.append(f"--train-top must not be negative, got {self.train_top}")
        if self.lora_rank < 1:
            problems.append(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            problems.append(f"--lora-alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_targets(self.lora_targets)
        except ConfigError as e:
            problems.append(str(e))
        for name in sorted(set(given) & {f.name for f in fields(self)} - {"method"}):
            wanted = "freeze" if name == "train_top" else name.split("_")[0]  # lora_rank -> lora
            if self.method != wanted:
                problems.append(f"{flag(name)} applies to --method {wanted}, not {self.method}")
        if problems:
            raise ConfigError("invalid fine-tuning configuration: " + "; ".join(problems))


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


# ---- what trains: one small object per --method ----------------------------------------------------------


class Full:
    """--method full: every weight trains; a checkpoint keeps them all."""

    loads_base_on_resume = False  # a resumed run's checkpoint holds every weight

    def __init__(self, ft: FinetuneConfig):
        self.ft = ft

    def adapt(self, model: torch.nn.Module) -> None:
        """Change the model before the optimizer sees it (it takes only parameters that require gradients)."""

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def restore(self, run: RunDir, model: torch.nn.Module, best: bool) -> None:
        run.load_weights_into(model, best=best)

    def start(self, run: RunDir, base: RunDir) -> None:
        """Write what the method adds to a new run directory."""

    def describe(self) -> str:
        return "full (every weight)"


class Freeze(Full):
    """--method freeze: the top --train-top blocks, the final norm and the head train; the blocks below are frozen."""

    def adapt(self, model: torch.nn.Module) -> None:
        freeze_below(model, self.ft.train_top)

    def describe(self) -> str:
        return f"freeze (training the top {self.ft.train_top} blocks, the final norm and the head)"


class Lora(Full):
    """--method lora: low-rank adapters train; a checkpoint keeps only them (adapter.safetensors) and the run
    refers to its base, whose weights every command that loads the run reads first."""

    loads_base_on_resume = True

    def adapt(self, model: torch.nn.Module) -> None:
        ft = self.ft
        add_adapters(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets))

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return adapter_weights(model)

    def restore(self, run: RunDir, model: torch.nn.Module, best: bool) -> None:
        path = run.checkpoint_path(best)
        try:
            load_adapter_weights(model, ckpt.load_weights(path))
        except ValueError as e:
            raise RunDirError(f"{path} does not fit this run's adapters: {e}") from None

    def start(self, run: RunDir, base: RunDir) -> None:
        if not run.has_adapter():
            ft = self.ft
            run.write_adapter_config(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets), base)

    def describe(self) -> str:
        ft = self.ft
        targets = ",".join(parse_targets(ft.lora_targets))
        return f"lora (rank {ft.lora_rank}, alpha {ft.lora_alpha:g}, dropout {ft.lora_dropout:g}, on {targets})"


STRATEGIES = {"full": Full, "freeze": Freeze, "lora": Lora}


# ---- what it trains on: conversations (raw text is the trainer's own TextData) ---------------------------


class ChatData:
    """Conversations, padded to the longest of a batch and never cut: the loss covers the assistant's tokens
    and each <|end|> (gradlm/text/sft.py); a seeded share is held out and scored the same way for validation.
    The same questions as TextData answers for text (see gradlm/training/trainer.py)."""

    def __init__(self, cfg: TrainConfig, tok, block: int, log):
        if cfg.sampler == "random":
            raise ConfigError(
                "--sampler random draws windows of text; conversations are visited once per epoch in a seeded order: "
                "drop --sampler"
            )
        if cfg.patience and cfg.val_fraction == 0:
            raise ConfigError(
                "--patience stops on the validation loss, but --val-fraction 0 holds no conversations out; set "
                "--val-fraction"
            )
        self.cfg, self.tok, self.pad = cfg, tok, pad_id(tok)
        self.sft = load_sft(cfg.data, tok, block)
        if self.sft.warning():
            log(self.sft.warning())
        self.train_examples, self.val_examples = split_examples(self.sft.examples, cfg.val_fraction, cfg.seed)
        # as many training conversations, spread evenly
        k = min(len(self.train_examples), max(len(self.val_examples), 32))
        self.train_probe = [self.train_examples[i * len(self.train_examples) // k] for i in range(k)]

    def check(self, block: int) -> None:
        """Conversations are padded to the longest one, never cut into windows: any window fits."""

    def sampler_kind(self, full_batch: bool) -> str:
        return "epoch"

    def sampler(self, kind: str, block: int):
        cfg = self.cfg
        sampler = SFTSampler(self.train_examples, self.pad, cfg.seed)
        # misspell / re-split the questions, not the replies (gradlm/text/augment.py)
        if cfg.bpe_dropout or cfg.typo_rate:
            from gradlm.text.augment import RobustSampler

            sampler = RobustSampler(
                sampler, self.tok, cfg.bpe_dropout, cfg.typo_rate, cfg.seed, block, context_only=True
            )
        return sampler, True

    def eval_windows(self, split: str, block: int, micro: int, dd) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Conversations in batches, this rank's share: the held-out ones ("val"), or as many training
        ones spread evenly ("train"). Their targets are the assistant's tokens and each <|end|>; every
        other position is -1, so the scorer leaves it out."""
        examples = self.val_examples if split == "val" else self.train_probe
        return batches(examples[dd.rank :: dd.world], micro, self.pad)

    def steps_per_epoch(self, batch: int, block: int) -> float:
        return len(self.train_examples) / batch

    def epochs(self, tokens_seen: int) -> float:
        """Passes over the training conversations, in tokens (the sampler counts them itself: see sampler_kind)."""
        return tokens_seen / sum(len(e.ids) for e in self.train_examples)

    def sample_prompt_ids(self, block: int) -> list[int]:
        """The first held-out conversation up to where the assistant's reply starts, so the samples show the
        model answering a question it never trained on (--sample-prompt: that text as a user turn)."""
        if self.cfg.sample_prompt:
            return encode_chat(self.tok, [{"role": "user", "content": self.cfg.sample_prompt}])
        e = (self.val_examples or self.train_examples)[0]
        return e.ids[: e.mask.index(True)] if True in e.mask else e.ids

    def summary(self) -> dict:
        return {
            "path": str(self.cfg.data),
            "format": "chat",
            "tokenizer": "given",
            "tokenizer_sha256": self.tok.sha256,
            "train_conversations": len(self.train_examples),
            "val_conversations": len(self.val_examples),
            "truncated": self.sft.truncated,
        }

    def describe(self, t: Trainer) -> str:
        lrs, cfg = base_lrs(t.opt), t.cfg
        return (
            f"model: {t.model.num_params():,} parameters, from {cfg.init} | data: {len(self.train_examples)} "
            "conversations "
            f"({len(self.val_examples)} held out), loss on the assistant's tokens | batch "
            f"{'full' if t.full_batch else t.batch} conversations "
            f"({t.accum} x {t.micro}) | {cfg.optimizer}, lr {lrs['lr']:g}, {cfg.schedule} | device {t.device}"
        )


# ---- the fine-tuner ---------------------------------------------------------------------------------------


class FineTuner(Trainer):
    """A Trainer that starts from a base run and trains conversations (ChatData, a masked loss) or text
    (the trainer's TextData), with all, some or low-rank parameters (Full, Freeze, Lora). Construct it like
    Trainer, then build() it (run() builds it too)."""

    def __init__(
        self,
        base: str,
        ft: FinetuneConfig,
        cfg: TrainConfig,
        dropout: float = 0.0,
        log=None,
        given: Iterable[str] | None = None,
    ):
        given_ft = given_fields(ft, given)
        if cfg.resume:
            ft = self._saved_finetune(cfg.out, ft, given_ft)
        ft.validate(given_ft)
        if base:
            # the Trainer starts a new run from it: its model, tokenizer, weights
            cfg = dataclasses.replace(cfg, init=base)
            given = None if given is None else {*given, "init"}
        elif not cfg.resume:
            raise ConfigError("say which run to fine-tune: gradlm finetune BASE_RUN --data FILE --out RUN")
        if ft.method == "freeze" and not cfg.resume:  # before any work: the base's depth is in its config
            n = RunDir(cfg.init).model_config().n_layer
            if ft.train_top > n:
                raise ConfigError(
                    f"--train-top {ft.train_top}: the model has {n} blocks; train between 0 (the head only) and {n} "
                    "of them"
                )
        super().__init__(ModelConfig(dropout=dropout), cfg, log=log, given=given)
        self.ft, self.method = ft, STRATEGIES[ft.method](ft)
        self.command = "finetune"

    def build(self) -> FineTuner:
        if self.built:
            return self
        super().build()
        self.config_extra["finetune"] = {"base_run": str(self.cfg.init), **asdict(self.ft)}
        m, opt_name = self.model, self.cfg.optimizer
        self.report = {
            "finetune_method": self.ft.method,
            "trainable_params": count_params(m, trainable=True),
            "full_finetune_params": self.full_params,
            "optimizer_state_bytes": 4 * state_floats(m, opt_name),
            "full_finetune_optimizer_state_bytes": self.full_state_bytes,
        }
        return self

    @staticmethod
    def _saved_finetune(out: str, asked: FinetuneConfig, given: set[str]) -> FinetuneConfig:
        """The run's own fine-tuning settings; a given one that differs cannot apply to it."""
        saved = RunDir(out).read_config().get("finetune")
        if not isinstance(saved, dict):
            raise RunDirError(
                f"{out} was not made by `gradlm finetune`; continue it with `gradlm train --out {out} --resume`"
            )
        # runs made before the flag was renamed (its old name said the opposite of what it did)
        if "freeze_layers" in saved:
            saved = {"train_top": saved["freeze_layers"], **saved}
        ft = FinetuneConfig(**{f.name: saved[f.name] for f in fields(FinetuneConfig) if f.name in saved})
        for name in sorted(given):
            if getattr(asked, name) != getattr(ft, name):
                raise ConfigError(
                    f"{flag(name)} {getattr(asked, name)} cannot change on --resume (the run was fine-tuned with "
                    f"{getattr(ft, name)!r}); drop it, or fine-tune a new run"
                )
        return ft

    def load_data(self, model_cfg: ModelConfig):
        """Conversations (a chat .jsonl) in the base run's tokenizer, or text as pretraining reads it."""
        if not is_chat_file(self.cfg.data):
            return super().load_data(model_cfg)
        # on resume, the run's own copy of the base's tokenizer
        return ChatData(self.cfg, self.init_tok, model_cfg.block_size, self.log)

    def adapt_model(self) -> None:
        m = self.model
        # Trainer loads the base into a new run only. A resumed LoRA run needs it under its adapter, and a
        # run stopped before its first checkpoint starts from it again.
        if self.cfg.resume and (self.method.loads_base_on_resume or not self.run.checkpoint_path().is_file()):
            (self.run.base_run() if self.run.has_adapter() else RunDir(self.cfg.init)).load_weights_into(m)
        self.full_params = count_params(m)  # before the method adds or freezes anything: what full fine-tuning trains
        self.full_state_bytes = 4 * state_floats(m, self.cfg.optimizer, trainable_only=False)
        self.method.adapt(m)

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return self.method.weights(self.model)

    def restore_weights(self, best: bool) -> None:
        self.method.restore(self.run, self.model, best)

    def start_run_dir(self) -> None:
        super().start_run_dir()
        if not self.dd.main:
            return
        base = RunDir(self.cfg.init)
        self.method.start(self.run, base)
        if isinstance(self.source, ChatData) or base.has_chat_template():
            self.run.write_chat_template()

    def describe(self) -> str:
        r, cfg = self.report, self.cfg
        return (
            f"{super().describe()}\n"
            f"fine-tuning: {self.method.describe()}: {r['trainable_params']:,} trainable parameters of "
            f"{r['full_finetune_params']:,} "
            f"({r['trainable_params'] / r['full_finetune_params']:.1%}); {cfg.optimizer} state "
            f"{_mb(r['optimizer_state_bytes'])} "
            f"vs {_mb(r['full_finetune_optimizer_state_bytes'])} for full fine-tuning"
        )


def finetune(
    base: str,
    cfg: TrainConfig,
    ft: FinetuneConfig | None = None,
    dropout: float = 0.0,
    given: Iterable[str] | None = None,
) -> dict:
    """Fine-tune the run `base` on cfg.data into cfg.out; returns the training summary (with trainable
    parameters and optimizer memory against full fine-tuning). base may be "" with cfg.resume.

        >>> cfg = TrainConfig(data="qa.jsonl", out="runs/qa", max_epochs=3)
        >>> finetune("runs/base", cfg, FinetuneConfig(method="lora"))  # doctest: +SKIP
    """
    return run(FineTuner(base, ft or FinetuneConfig(), cfg, dropout=dropout, given=given))


def merge(run_dir: str | os.PathLike, out_dir: str | os.PathLike, best: bool = False, device: str = "cpu") -> dict:
    """Write a LoRA run as a run of full weights (its base's weights with the adapter folded in), which
    needs neither the base run nor peft. out_dir must not exist yet (or be empty). The weights are loaded
    on device (the fold itself happens as they load, in float32) and saved in float32."""
    src, out = RunDir(run_dir), Path(out_dir)
    cfg = src.read_config()
    if not src.has_adapter():
        raise RunDirError(f"{src.path} has no LoRA adapter to merge: its weights are already full; use it as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} already exists; merge into a new directory")
    model, tok = src.load_model(best, device)
    path = src.checkpoint_path(best)
    adapter = src.read_adapter_config()
    merged_from = {
        "run": str(src.path.resolve()),
        "adapter": path.name,
        "base_run": str((src.path / adapter["base_run"]).resolve()),
    }
    config = config_dict(
        model.cfg, cfg.get("train", {}), cfg.get("data", {}), finetune=cfg.get("finetune"), merged_from=merged_from
    )
    weights = {k: v.float().cpu() for k, v in model.state_dict().items()}
    RunDir.create(out, config, tok, weights, weights_step(path), chat_template=src.has_chat_template())
    return {"run": str(out), "params": model.num_params(), "from": str(path)}
