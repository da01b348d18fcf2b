"""Fine-tuning: start from a trained run and keep training it, on conversations or on more text.

    gradlm finetune runs/base --data qa.jsonl --out runs/qa --method lora --max-epochs 3

The data decides what is learned:
  chat .jsonl ("messages", or "prompt"/"completion" per line)   supervised fine-tuning (SFT): the loss
      covers only the assistant's tokens and each <|end|> (gradlm/sft.py), a seeded share of the
      conversations is held out and scored the same way for validation;
  raw text                                                      continued pretraining, as `train --init`.
The method decides what trains (gradlm/lora.py):
  full     every weight;
  freeze   the top --train-top blocks, the final norm and the head;
  lora     low-rank adapters on --lora-targets; the run keeps only the adapter (adapter.safetensors)
           and refers to its base run, and every command that loads a run folds it in.

It is the gradient-descent loop of gradlm/trainer.py: FineTuner is a Trainer whose public hooks load
conversations, freeze or add adapters, checkpoint the adapter and give validation the held-out
conversations (scored by the one scorer, gradlm/scoring.py, on the replies only), so optimizers,
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

from gradlm import checkpoint as ckpt
from gradlm.chat import encode_chat
from gradlm.config import TrainConfig, given_fields
from gradlm.errors import ConfigError, RunDirError, flag
from gradlm.lora import LORA_TARGETS, add_adapters, adapter_weights, count_params, freeze_below, load_adapter_weights, parse_targets
from gradlm.model import ModelConfig
from gradlm.optim import base_lrs, state_floats
from gradlm.rundir import RunDir, config_dict, weights_step
from gradlm.sft import SFTSampler, batches, is_chat_file, load_sft, pad_id, split_examples
from gradlm.trainer import Trainer, run

METHODS = ("full", "freeze", "lora")


@dataclass
class FinetuneConfig:
    """What a fine-tune trains. Saved as the "finetune" section of the run's config.json."""

    method: str = field(default="full", metadata={"help": "full (every weight), freeze (only the top --train-top blocks + head) or lora (low-rank adapters)"})
    train_top: int = field(default=1, metadata={"help": "--method freeze: train only the top N blocks, the final norm and the head (0 = the head only); every block below them is frozen"})
    lora_rank: int = field(default=8, metadata={"help": "--method lora: rank r of each adapter"})
    lora_alpha: float = field(default=16.0, metadata={"help": "--method lora: the adapter's update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "--method lora: dropout on the adapters' input"})
    lora_targets: str = field(default=",".join(LORA_TARGETS), metadata={"help": "--method lora: comma-separated projections to adapt (or all)"})

    def validate(self, typed: Iterable[str] = ()) -> None:
        """Every problem at once; typed names the flags given, so one that does not apply is refused."""
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
        for name in sorted(set(typed) & {f.name for f in fields(self)} - {"method"}):
            wanted = "freeze" if name == "train_top" else name.split("_")[0]  # lora_rank -> lora
            if self.method != wanted:
                problems.append(f"{flag(name)} applies to --method {wanted}, not {self.method}")
        if problems:
            raise ConfigError("invalid fine-tuning configuration: " + "; ".join(problems))

    def describe(self) -> str:
        if self.method == "freeze":
            return f"freeze (training the top {self.train_top} blocks, the final norm and the head)"
        if self.method == "lora":
            return f"lora (rank {self.lora_rank}, alpha {self.lora_alpha:g}, dropout {self.lora_dropout:g}, on {','.join(parse_targets(self.lora_targets))})"
        return "full (every weight)"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


class FineTuner(Trainer):
    """A Trainer that starts from a base run and trains conversations (masked loss) or text, with all,
    some or low-rank parameters. Construct it like Trainer; its hooks are the differences."""

    def __init__(self, base: str, ft: FinetuneConfig, cfg: TrainConfig, dropout: float = 0.0, log=None, given: Iterable[str] | None = None):
        typed = given_fields(ft, given)
        if cfg.resume:
            ft = self._saved_finetune(cfg.out, ft, typed)
        ft.validate(typed)
        if base:
            cfg = dataclasses.replace(cfg, init=base)  # the Trainer starts a new run from it: its model, tokenizer, weights
            given = None if given is None else {*given, "init"}
        elif not cfg.resume:
            raise ConfigError("say which run to fine-tune: gradlm finetune BASE_RUN --data FILE --out RUN")
        if ft.method == "freeze" and not cfg.resume:  # before any work: the base's depth is in its config
            n = RunDir(cfg.init).model_config().n_layer
            if ft.train_top > n:
                raise ConfigError(f"--train-top {ft.train_top}: the model has {n} blocks; train between 0 (the head only) and {n} of them")
        self.ft = ft
        super().__init__(ModelConfig(dropout=dropout), cfg, log=log, given=given)
        self.command = "finetune"
        self.config_extra = {"finetune": {"base_run": str(self.cfg.init), **asdict(ft)}}
        m, opt_name = self.model, self.cfg.optimizer
        self.report = {
            "finetune_method": ft.method, "trainable_params": count_params(m, trainable=True), "full_finetune_params": self.full_params,
            "optimizer_state_bytes": 4 * state_floats(m, opt_name), "full_finetune_optimizer_state_bytes": self.full_state_bytes,
        }

    @staticmethod
    def _saved_finetune(out: str, given: FinetuneConfig, typed: set[str]) -> FinetuneConfig:
        """The run's own fine-tuning settings; a typed one that differs cannot apply to it."""
        saved = RunDir(out).read_config().get("finetune")
        if not isinstance(saved, dict):
            raise RunDirError(f"{out} was not made by `gradlm finetune`; continue it with `gradlm train --out {out} --resume`")
        if "freeze_layers" in saved:  # runs made before the flag was renamed (its old name said the opposite of what it did)
            saved = {"train_top": saved["freeze_layers"], **saved}
        ft = FinetuneConfig(**{f.name: saved[f.name] for f in fields(FinetuneConfig) if f.name in saved})
        for name in sorted(typed):
            if getattr(given, name) != getattr(ft, name):
                raise ConfigError(f"{flag(name)} {getattr(given, name)} cannot change on --resume (the run was fine-tuned with {getattr(ft, name)!r}); drop it, or fine-tune a new run")
        return ft

    # -- data: conversations (SFT) or text (continued pretraining, as Trainer does it)

    def load_data(self, model_cfg: ModelConfig) -> None:
        cfg = self.cfg
        self.chat = is_chat_file(cfg.data)
        if not self.chat:
            return super().load_data(model_cfg)
        if cfg.sampler == "random":
            raise ConfigError("--sampler random draws windows of text; conversations are visited once per epoch in a seeded order: drop --sampler")
        if cfg.patience and cfg.val_fraction == 0:
            raise ConfigError("--patience stops on the validation loss, but --val-fraction 0 holds no conversations out; set --val-fraction")
        tok = self.init_tok  # the base run's tokenizer (on resume, the run's own copy of it)
        self.pad = pad_id(tok)
        self.sft = load_sft(cfg.data, tok, model_cfg.block_size)
        if self.sft.warning():
            self.log(self.sft.warning())
        self.train_examples, self.val_examples = split_examples(self.sft.examples, cfg.val_fraction, cfg.seed)
        k = min(len(self.train_examples), max(len(self.val_examples), 32))  # as many training conversations, spread evenly
        self.train_probe = [self.train_examples[i * len(self.train_examples) // k] for i in range(k)]
        self.tok, self.model_cfg, self.block = tok, model_cfg, model_cfg.block_size

    def check_data(self) -> None:
        if not self.chat:  # conversations are padded to the longest one, never cut into windows
            super().check_data()

    def make_sampler(self):
        if not self.chat:
            return super().make_sampler()
        self.sampler_kind, self.masked_targets = "epoch", True
        sampler = SFTSampler(self.train_examples, self.pad, self.cfg.seed)
        if self.cfg.bpe_dropout or self.cfg.typo_rate:  # misspell / re-split the questions, not the replies (gradlm/robust.py)
            from gradlm.robust import RobustSampler

            sampler = RobustSampler(sampler, self.tok, self.cfg.bpe_dropout, self.cfg.typo_rate, self.cfg.seed, self.block, context_only=True)
        return sampler

    def steps_per_epoch(self) -> float:
        return len(self.train_examples) / self.batch if self.chat else super().steps_per_epoch()

    def data_summary(self) -> dict:
        if not self.chat:
            return super().data_summary()
        return {"path": str(self.cfg.data), "format": "chat", "tokenizer": "given", "tokenizer_sha256": self.tok.sha256,
                "train_conversations": len(self.train_examples), "val_conversations": len(self.val_examples), "truncated": self.sft.truncated}

    # -- the model: what trains

    def adapt_model(self) -> None:
        m, ft = self.model, self.ft
        # Trainer loads the base into a new run only. A resumed LoRA run needs it under its adapter, and a
        # run stopped before its first checkpoint starts from it again.
        if self.cfg.resume and (ft.method == "lora" or not self.run.checkpoint_path().is_file()):
            (self.run.base_run() if self.run.has_adapter() else RunDir(self.cfg.init)).load_weights_into(m)
        self.full_params = count_params(m)
        self.full_state_bytes = 4 * state_floats(m, self.cfg.optimizer, trainable_only=False)
        if ft.method == "freeze":
            freeze_below(m, ft.train_top)
        elif ft.method == "lora":
            add_adapters(m, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets))

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return adapter_weights(self.model) if self.ft.method == "lora" else super().checkpoint_weights()

    def restore_weights(self, best: bool) -> None:
        if self.ft.method != "lora":
            return super().restore_weights(best)
        path = self.run.checkpoint_path(best)
        try:
            load_adapter_weights(self.model, ckpt.load_weights(path))
        except ValueError as e:
            raise RunDirError(f"{path} does not fit this run's adapters: {e}") from None

    def start_run_dir(self) -> None:
        super().start_run_dir()
        if not self.dd.main:
            return
        if self.ft.method == "lora" and not self.run.has_adapter():
            ft = self.ft
            self.run.write_adapter_config(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets), RunDir(self.cfg.init))
        if self.chat or RunDir(self.cfg.init).has_chat_template():
            self.run.write_chat_template()

    # -- validation: held-out conversations, scored on the replies

    def eval_windows(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Conversations in batches, this rank's share: the held-out ones ("val"), or as many training
        ones spread evenly ("train"). Their targets are the assistant's tokens and each <|end|>; every
        other position is -1, so the scorer leaves it out. Text is scored as pretraining scores it."""
        if not self.chat:
            return super().eval_windows(split)
        examples = self.val_examples if split == "val" else self.train_probe
        return batches(examples[self.dd.rank :: self.dd.world], self.micro, self.pad)

    def sample_prompt_ids(self) -> list[int]:
        """Chat data: the first held-out conversation up to where the assistant's reply starts, so the samples
        show the model answering a question it never trained on (--sample-prompt: that text as a user turn)."""
        if not self.chat:
            return super().sample_prompt_ids()
        if self.cfg.sample_prompt:
            return encode_chat(self.tok, [{"role": "user", "content": self.cfg.sample_prompt}])
        e = (self.val_examples or self.train_examples)[0]
        return e.ids[: e.mask.index(True)] if True in e.mask else e.ids

    def describe(self) -> str:
        r, cfg = self.report, self.cfg
        lines = []
        if self.chat:
            lrs = base_lrs(self.opt)
            batch = "full" if self.full_batch else self.batch
            lines.append(
                f"model: {self.full_params:,} parameters, from {cfg.init} | data: {len(self.train_examples)} conversations "
                f"({len(self.val_examples)} held out), loss on the assistant's tokens | batch {batch} conversations ({self.accum} x {self.micro}) | "
                f"{cfg.optimizer}, lr {lrs['lr']:g}, {cfg.schedule} | device {self.device}"
            )
        else:
            lines.append(super().describe())
        lines.append(
            f"fine-tuning: {self.ft.describe()}: {r['trainable_params']:,} trainable parameters of {r['full_finetune_params']:,} "
            f"({r['trainable_params'] / r['full_finetune_params']:.1%}); {cfg.optimizer} state {_mb(r['optimizer_state_bytes'])} "
            f"vs {_mb(r['full_finetune_optimizer_state_bytes'])} for full fine-tuning"
        )
        return "\n".join(lines)


def finetune(base: str, cfg: TrainConfig, ft: FinetuneConfig | None = None, dropout: float = 0.0, given: Iterable[str] | None = None) -> dict:
    """Fine-tune the run `base` on cfg.data into cfg.out; returns the training summary (with trainable
    parameters and optimizer memory against full fine-tuning). base may be "" with cfg.resume.

        >>> finetune("runs/base", TrainConfig(data="qa.jsonl", out="runs/qa", max_epochs=3), FinetuneConfig(method="lora"))  # doctest: +SKIP
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
    merged_from = {"run": str(src.path.resolve()), "adapter": path.name, "base_run": str((src.path / adapter["base_run"]).resolve())}
    config = config_dict(model.cfg, cfg.get("train", {}), cfg.get("data", {}), finetune=cfg.get("finetune"), merged_from=merged_from)
    weights = {k: v.float().cpu() for k, v in model.state_dict().items()}
    RunDir.create(out, config, tok, weights, weights_step(path), chat_template=src.has_chat_template())
    return {"run": str(out), "params": model.num_params(), "from": str(path)}
