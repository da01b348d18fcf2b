"""The run directory, gradlm's unit of work, and its one owner.

    runs/NAME/
      config.json          {"model", "train", "data", "gradlm_version"}: one schema, written here only
      tokenizer.json       the tokenizer (Hugging Face format)
      model.safetensors    latest weights; metadata {"step"}
      best.safetensors     the weights with the best validation loss (a hard link to a past latest)
      adapter_config.json  a LoRA run only: rank, alpha, targets and the base run it adapts; such a run
      adapter.safetensors  keeps its adapter instead of full weights (best_adapter.safetensors for the
                           best), and loading it loads the base run's weights and folds the adapter in
      chat_template.jinja  the chat template, in a run fine-tuned for chat (gradlm/text/chat.py)
      state/trainer.pt     optimizer, sampler, RNG, counters of the latest checkpoint (weights_only load)
      state/previous.pt    the checkpoint before it, kept until the next one is complete
      state/best.pt        the state that goes with best.safetensors (resume with --from-best)
      metrics.jsonl        one JSON object per logged step / evaluation / event (guard restores, overfitting,
                           early stopping, resumes, budget extensions, why it stopped)
      samples.jsonl        what the model writes at each evaluation: a seeded sample from a fixed prompt
      summary.json         the final report of the last training
      plots/               curves as PNG
      snapshots/           --snapshots N: the weights at N points of the run, evenly spaced over its budget
                           (step-NNNNNNN.safetensors, metadata {"step"}): the path it took (gradlm landscape)
      trackers.json        --logger: each experiment tracker's id of this run
                           (gradlm/training/trackers.py); tensorboard/
                           and wandb/ hold those trackers' own files
      .lock                held (flock) by the one process writing the run

Training and fine-tuning write a run through RunDir's methods (config, tokenizer, checkpoints, metrics,
summary, plots, chat template, adapter config), merge and import write a whole run at once with
RunDir.create; generation, evaluation, export and the CLI read it here. The one reader that does not is
`gradlm watch` (gradlm/serving/watch.py), which may not import torch: it reads config.json, metrics.jsonl,
samples.jsonl and summary.json itself. Loading a model imports the model and the tokenizer, never the trainer.

A checkpoint is the pair (state, weights). Both are written to temporary files first; only then are
they renamed into place, state before weights, keeping the previous state as previous.pt. A crash at
any moment leaves weights whose step (in their metadata) matches trainer.pt or previous.pt, and
load_state() picks the matching one, so resume is exact even after kill -9.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import torch

from gradlm import files as ckpt
from gradlm import layout
from gradlm.text.datasets import sha256_file
from gradlm.errors import RunDirError
from gradlm.model.lora import fold_adapter
from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.text.tokenizer import Tokenizer


def package_version() -> str:
    from gradlm import __version__

    return __version__


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return -1


class RunDir:
    """Paths and reads/writes of one run directory. RunDir("runs/x").load_model() etc."""

    def __init__(self, path: str | os.PathLike):
        self.path = p = Path(path)  # the names: gradlm/layout.py
        self.config, self.tokenizer = p / layout.CONFIG, p / layout.TOKENIZER
        self.weights, self.best = p / layout.WEIGHTS, p / layout.BEST
        self.state, self.previous_state, self.best_state = (
            p / layout.STATE,
            p / layout.PREVIOUS_STATE,
            p / layout.BEST_STATE,
        )
        self.metrics, self.samples, self.summary = p / layout.METRICS, p / layout.SAMPLES, p / layout.SUMMARY
        self.training_plot = p / layout.TRAINING_PLOT
        self.plots = self.training_plot.parent
        self.lock_file = p / layout.LOCK
        self.snapshots = p / layout.SNAPSHOTS
        self.adapter_config, self.adapter, self.best_adapter = (
            p / layout.ADAPTER_CONFIG,
            p / layout.ADAPTER,
            p / layout.BEST_ADAPTER,
        )
        self._lock: RunLock | None = None  # held by the one process writing the run: acquire(), release()

    def __str__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.config.is_file()

    # ---- config.json: the one schema

    def read_config(self) -> dict:
        """config.json, checked: a gradlm run of a version this one can read."""
        if not self.path.is_dir():
            raise RunDirError(f"no run directory at {self.path}; train one with `gradlm train --out {self.path}`")
        if not self.exists():
            raise RunDirError(
                f"{self.path} is not a run directory (no config.json); train one with `gradlm train --out {self.path}`"
            )
        cfg = ckpt.read_json(self.config, "run config")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise RunDirError(f"{self.config} has no model section; is {self.path} a gradlm run directory?")
        version = cfg.get("gradlm_version", "0")
        if _major(version) > _major(package_version()) or _major(version) < 0:
            raise RunDirError(
                f"{self.path} was written by gradlm {version}, which this gradlm {package_version()} cannot read; "
                "upgrade gradlm"
            )
        return cfg

    def model_config(self) -> ModelConfig:
        from gradlm.errors import ConfigError

        try:
            return ModelConfig.from_dict(self.read_config()["model"])
        except (ConfigError, TypeError) as e:
            raise RunDirError(f"{self.config}: the model section is invalid ({e})") from None

    def write_config(self, model: ModelConfig, train: dict, data: dict, **extra) -> None:
        ckpt.atomic_write_json(self.config, config_dict(model, train, data, **extra))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        config: dict,
        tok: Tokenizer,
        weights: dict[str, torch.Tensor],
        step: int,
        chat_template: bool = False,
    ) -> RunDir:
        """Write a complete run in one go (merge, import): tokenizer, weights (at step), the chat template
        if asked, and config.json (a config_dict) last, since it marks a complete run. All of it is built in
        a temporary folder renamed into place: a failure leaves no half-written run."""

        def write(tmp: Path) -> None:
            run = cls(tmp)
            run.save_tokenizer(tok)
            ckpt.save_weights(run.weights, weights, {"step": str(step)})
            if chat_template:
                run.write_chat_template()
            ckpt.atomic_write_json(run.config, config)

        ckpt.atomic_write_dir(Path(path), write)
        return cls(path)

    # ---- tokenizer, weights

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer)

    def save_tokenizer(self, tok: Tokenizer) -> None:
        tok.save(self.tokenizer)

    def has_adapter(self) -> bool:
        """Whether this is a LoRA run: its checkpoints hold an adapter over a base run's weights."""
        return self.adapter_config.is_file()

    def checkpoint_path(self, best: bool = False) -> Path:
        """The weights file a checkpoint writes: the adapter of a LoRA run, else the full weights."""
        if self.has_adapter():
            return self.best_adapter if best else self.adapter
        return self.best if best else self.weights

    def load_weights_into(self, model: Transformer, best: bool = False) -> int:
        """Load the latest (or best) weights into model; returns their step (-1 if not recorded).
        A LoRA run loads its base run's weights and adds its adapter into them (fold_adapter)."""
        path = self.checkpoint_path(best)
        if best and not path.is_file():
            raise RunDirError(
                f"{self.path} has no {path.name} yet (it is written at the first evaluation); drop --best"
            )
        self._load_into(model, path)
        return weights_step(path)

    def _load_into(self, model: Transformer, path: Path) -> None:
        """Load a weights file of this run (a checkpoint's, or a snapshot) into model; a LoRA run's holds an
        adapter, folded into its base run's weights."""
        try:
            if self.has_adapter():
                adapter = self.read_adapter_config()
                self.base_run(adapter).load_weights_into(model)
                fold_adapter(model, ckpt.load_weights(path), adapter["lora_alpha"] / adapter["r"])
            else:
                model.load_weights(ckpt.load_weights(path))
        except ValueError as e:
            raise RunDirError(f"{path} does not fit the model in config.json: {e}") from None

    # ---- the path training took: --snapshots

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots / f"step-{step:07d}.safetensors"

    def save_snapshot(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """snapshots/step-NNNNNNN.safetensors: the tensors a checkpoint keeps, at this step, written atomically
        (a second snapshot of the same step replaces the first)."""
        try:
            ckpt.save_weights(self.snapshot_path(step), weights, {"step": str(step)})
        except OSError as e:
            raise RunDirError(_write_failure(self.path, e, "snapshot")) from None

    def list_snapshots(self) -> list[int]:
        """The steps of the run's snapshots, in order."""
        if not self.snapshots.is_dir():
            return []
        names = [p.name for p in self.snapshots.glob("step-*.safetensors")]
        steps = (n.removeprefix("step-").removesuffix(".safetensors") for n in names)
        return sorted(int(s) for s in steps if s.isdigit())

    def drop_snapshots(self, after: int) -> None:
        """Remove the snapshots of the steps after `after`: a run going back to that step (a resume, a divergence
        guard restore) takes them again on its way."""
        for step in self.list_snapshots():
            if step > after:
                self.snapshot_path(step).unlink(missing_ok=True)

    def load_snapshot_into(self, model: Transformer, step: int) -> None:
        """Load the snapshot of this step into model (a LoRA run's: its adapter folded into the base weights)."""
        self._load_into(model, self.snapshot_path(step))

    def write_chat_template(self) -> Path:
        """chat_template.jinja: the run was fine-tuned for chat (or from a run that was); see gradlm/text/chat.py."""
        from gradlm.text.chat import write_chat_template

        return write_chat_template(self.path)

    def has_chat_template(self) -> bool:
        from gradlm.text.chat import read_chat_template

        return read_chat_template(self.path) is not None

    # ---- LoRA adapters

    def write_adapter_config(self, rank: int, alpha: float, dropout: float, targets: list[str], base: RunDir) -> None:
        """adapter_config.json: the adapter's shape and the base run it adapts, by a path relative to this
        run (move the two together) and the sha256 of the base weights it was trained on."""
        base_path = Path(os.path.relpath(base.path.resolve(), self.path.resolve()))
        ckpt.atomic_write_json(
            self.adapter_config,
            {
                "format": "gradlm-lora",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": dropout,
                "target_modules": list(targets),
                "base_run": base_path.as_posix(),
                "base_weights_sha256": sha256_file(base.checkpoint_path()),
            },
        )

    def read_adapter_config(self) -> dict:
        cfg = ckpt.read_json(self.adapter_config, "adapter config")
        need = {
            "r": int,
            "lora_alpha": (int, float),
            "target_modules": list,
            "base_run": str,
            "base_weights_sha256": str,
        }
        bad = [k for k, kind in need.items() if not isinstance(cfg.get(k) if isinstance(cfg, dict) else None, kind)]
        if bad or cfg.get("r", 0) < 1:
            raise RunDirError(
                f"{self.adapter_config} is corrupt ({', '.join(bad) or 'r'} missing or invalid); fine-tune the run "
                "again"
            )
        return cfg

    def base_run(self, adapter: dict | None = None) -> RunDir:
        """The run a LoRA run adapts, checked to hold the weights the adapter was trained on."""
        adapter = adapter or self.read_adapter_config()
        base = RunDir(self.path / adapter["base_run"])
        if not base.checkpoint_path().is_file():
            raise RunDirError(
                f"{self.path} is a LoRA adapter over {base.path}, which has no weights; put the base run back at that "
                "path "
                f"(it is relative to {self.path}), or use a run merged with `gradlm merge`"
            )
        if sha256_file(base.checkpoint_path()) != adapter["base_weights_sha256"]:
            raise RunDirError(
                f"the base run {base.path} has changed since the adapter in {self.path} was trained on it (its "
                "weights differ); "
                "restore the base run's weights, or fine-tune again from it as it is now"
            )
        return base

    def load_model(
        self, best: bool = False, device: str = "cpu", dtype: str = "float32"
    ) -> tuple[Transformer, Tokenizer]:
        """The model (eval mode, on device, weights in dtype: "bfloat16", else float32) and its tokenizer."""
        model = Transformer(self.model_config())
        self.load_weights_into(model, best)
        return model.to(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32).eval(), self.load_tokenizer()

    # ---- checkpoints: (training state, weights)

    def save_checkpoint(self, state: dict, weights: dict[str, torch.Tensor], step: int) -> None:
        """Write the pair atomically enough for kill -9 (see the module docstring). A full disk or an
        unwritable folder is a RunDirError; the previous checkpoint stays intact and loadable."""
        state = dict(state, step=step)
        staged: list[Path] = []
        try:
            staged.append(ckpt.stage(self.state, lambda tmp: torch.save(state, tmp)))
            target = self.checkpoint_path()
            staged.append(ckpt.stage(target, lambda tmp: ckpt.write_weights(tmp, weights, {"step": str(step)})))
            if self.state.is_file():
                os.replace(self.state, self.previous_state)
            os.replace(staged[0], self.state)
            os.replace(staged[1], target)
            ckpt.sync_dir(self.state.parent)
            ckpt.sync_dir(self.path)
        except OSError as e:
            for tmp in staged:
                tmp.unlink(missing_ok=True)
            raise RunDirError(_write_failure(self.path, e, "checkpoint")) from None

    def mark_best(self) -> None:
        """The latest checkpoint becomes the best one: hard links, no copy (fall back to copying)."""
        try:
            ckpt.link_or_copy(self.state, self.best_state)
            ckpt.link_or_copy(self.checkpoint_path(), self.checkpoint_path(best=True))
        except OSError as e:
            raise RunDirError(_write_failure(self.path, e, "best checkpoint")) from None

    def load_state(self, from_best: bool = False) -> dict:
        """The training state matching the weights on disk (latest, or best with from_best)."""
        weights = self.checkpoint_path(best=from_best)
        if not weights.is_file():
            raise RunDirError(
                f"cannot resume: {weights} is missing"
                + ("; resume without --from-best" if from_best else "; the run has no checkpoint yet, start it again")
            )
        step = weights_step(weights)
        candidates = [self.best_state] if from_best else [self.state, self.previous_state]
        found = []
        for path in candidates:
            if path.is_file():
                state = ckpt.load_torch(path)
                found.append((path, state.get("step")))
                if state.get("step") == step:
                    return state
        if not found:
            raise RunDirError(
                f"cannot resume: {candidates[0]} is missing; "
                + ("this run kept no state for its best weights" if from_best else "the run has no training state")
            )
        raise RunDirError(
            f"cannot resume: {weights} is from step {step} but the training state {found[0][0]} is from step "
            f"{found[0][1]}; the run is inconsistent"
        )

    # ---- summary, lock

    def read_summary(self) -> dict:
        """summary.json of the last training ({} when there is none or it cannot be read)."""
        try:
            out = json.loads(self.summary.read_text())
            return out if isinstance(out, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_summary(self, summary: dict) -> None:
        try:
            ckpt.atomic_write_json(self.summary, summary)
        except OSError as e:
            raise RunDirError(_write_failure(self.path, e, "summary")) from None

    def write_training_plot(self, runs: dict[str, list[dict]] | None = None) -> Path:
        """plots/training.png: this run's loss, learning rate and gradient-norm curves (runs: several runs'
        metrics to draw together instead, as `gradlm plot` does)."""
        from gradlm.plots import plot_runs

        return plot_runs(
            runs or {self.path.name or str(self.path): read_metrics(self.path)},
            self.training_plot,
            title="" if runs else str(self.path),
        )

    def acquire(self) -> None:
        """Hold the run's lock (one writer per run: RunLock) until release(); holding it already is fine."""
        if self._lock is None:
            self._lock = RunLock(self.lock_file).acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        """Whether this RunDir holds its run's lock."""
        return self._lock is not None


def config_dict(model: ModelConfig, train: dict, data: dict, **extra) -> dict:
    """The config.json schema: model shape, training settings, data identity, version, extras.
    A batch of N windows is stored as the number N ("full" stays a string)."""
    batch = train.get("batch")
    if isinstance(batch, str) and batch.isdigit():
        train = {**train, "batch": int(batch)}
    return {"model": model.to_dict(), "train": train, "data": data, **extra, "gradlm_version": package_version()}


def weights_step(path: Path) -> int:
    meta = ckpt.weights_metadata(path)
    try:
        return int(meta.get("step", -1))
    except ValueError:
        return -1


def _write_failure(run: Path, e: OSError, what: str) -> str:
    reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    try:  # a fine-tuned run (its config.json has a "finetune" section) resumes with the command that made it
        command = "finetune" if "finetune" in json.loads((run / "config.json").read_text()) else "train"
    except (OSError, ValueError):
        command = "train"
    return (
        f"cannot write the {what} in {run}: {reason}; the previous checkpoint is intact: free space (or fix "
        f"permissions) and continue with `gradlm {command} --out {run} --resume`"
    )


class RunLock:
    """One writer per run: an exclusive flock on RUN/.lock. The kernel drops it when the process dies,
    so a crash never leaves a stale lock. The holder's pid is written in the file for the message."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is being written by another gradlm process (pid {holder}); wait for it to "
                "finish, stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a Trainer dropped without close_run_dir() (Python API, tests) frees the run
        try:
            self.release()
        except Exception:  # at interpreter shutdown the modules it needs may be gone; the kernel frees the lock
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- metrics.jsonl


class Metrics:
    """A JSON-lines file of the run (metrics.jsonl, samples.jsonl): one JSON object per row, appended as written,
    each row one write of one line (a reader tailing the file sees whole lines, or a last one still coming)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        # called with every row written (the run's experiment trackers, gradlm/training/trackers.py)
        self.listener = None

    def truncate_after(self, step: int) -> int:
        """On resume, drop lines the interrupted run wrote after the checkpoint it resumes from; returns the last
        step the file held before (-1 when it held none)."""
        if not self.path.is_file():
            return -1
        keep, last = [], -1
        for ln in self.path.read_text(errors="replace").splitlines():
            try:
                at = json.loads(ln).get("step", 0)
            except (json.JSONDecodeError, AttributeError):  # a line cut short by a crash mid-write
                continue
            last = max(last, at)
            if at <= step:
                keep.append(ln)
        ckpt.atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        return last

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(ckpt.dumps(row) + "\n")
            if self.listener is not None:
                self.listener(row)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file of a run ([] if it has none), without a last line cut short by a crash."""
    rows = []
    if Path(path).is_file():
        for ln in Path(path).read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no metrics.jsonl; is it a gradlm run directory?")
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is corrupt ({e})") from None


def load_model(
    run_dir: str | os.PathLike, best: bool = False, device: str = "cpu", dtype: str = "float32"
) -> tuple[Transformer, Tokenizer]:
    """A trained model (in eval mode, on device, weights in dtype) and its tokenizer from a run directory.

    >>> model, tok = load_model("runs/demo")          # doctest: +SKIP
    """
    return RunDir(run_dir).load_model(best, device, dtype)
