"""Experiment trackers: a run's record, also where practitioners already look (--logger NAME[,NAME]).

gradlm's own record of a run is metrics.jsonl and samples.jsonl (gradlm/rundir.py). With --logger, every row
written there also goes, as it is written, to

  tensorboard  event files in RUN/tensorboard/           tensorboard --logdir runs
  wandb        Weights & Biases, offline by default      wandb sync RUN/wandb/offline-run-*
               (WANDB_MODE=online logs live)
  mlflow       MLflow, SQLite store beside the runs      mlflow ui --backend-store-uri sqlite:///runs/mlflow/mlflow.db
               (or $MLFLOW_TRACKING_URI, e.g. a tracking server)
  trackio      trackio's local store ($TRACKIO_DIR)       trackio show --project gradlm

What each receives: every number of a metrics.jsonl row (loss, val_loss, val_bpb, lr, grad_norm, tokens_per_s,
tokens, ...) at its step; the run's settings (config.json) as hyperparameters; the evaluation samples as text;
events (guard restores, overfitting, early stopping, the stop) where the tracker has a place for them; the run's
plots as images at the end. A resumed run continues the same tracked run (the ids live in RUN/trackers.json);
after a resume to a checkpoint earlier than what a tracker already holds, the steps it holds are not sent again
(gradlm's resume is exact: they would be the same points twice).

A tracker that fails while the run trains is dropped with one warning line: a logger never stops training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path

from gradlm import files as ckpt
from gradlm import layout
from gradlm.errors import ConfigError, GradlmError

# name -> the module it needs (the extra of the same name installs it: pip install 'gradlm[wandb]')
LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
LOGGER_HELP = (
    "also log the run to these experiment trackers, comma-separated: "
    + ", ".join(LOGGERS)
    + " (each an extra: pip install 'gradlm[wandb]')"
)
STATE_FILE = layout.TRACKERS  # in the run directory: each tracker's id of this run, so a resume continues it


def parse_loggers(text: str, flag: str = "--logger") -> list[str]:
    """The tracker names of a --logger value ('' = none); a ConfigError names an unknown one or a missing package."""
    names = list(dict.fromkeys(n.strip().lower() for n in (text or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"{flag} {unknown[0]!r} is not a tracker gradlm logs to; choose from {', '.join(LOGGERS)} "
            "(comma-separated for several)"
        )
    for n in names:
        if importlib.util.find_spec(LOGGERS[n]) is None:
            raise ConfigError(
                f"{flag} {n} needs the {LOGGERS[n]} package, which is not installed: pip install 'gradlm[{n}]'"
            )
    return names


def flat(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}: the run's settings as hyperparameters."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) or v is None else json.dumps(v)
    return out


def numbers(row: dict) -> dict[str, float]:
    """The scalars of a metrics.jsonl row: every finite number but the step (a flag such as "best" is not one).
    The run's clock, "time", is sent as "time_s" (trackio reserves "time" for its own)."""
    return {
        ("time_s" if k == "time" else k): v
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


@contextlib.contextmanager
def quiet():
    """Trackers print banners on stdout, where gradlm writes its results: silence them."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Tracker:
    """One tracker of one run. folder: the run directory (or lr-find's --out); name: how the run is shown;
    config: its settings; state: what this tracker saved for the run before (its id), {} for a new run."""

    name = ""

    def __init__(self, folder: Path, name: str, config: dict, state: dict):
        self.state: dict = {}
        self.where = ""  # one line: where to look

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def sample(self, step: int, prompt: str, text: str) -> None: ...
    def event(self, step: int, kind: str, message: str) -> None: ...
    def images(self, step: int, paths: dict[str, Path]) -> None: ...
    def close(self, ok: bool) -> None: ...


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, name: str, config: dict, state: dict):
        super().__init__(folder, name, config, state)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.w = SummaryWriter(log_dir=str(folder / "tensorboard"))
        hp = {k: "" if v is None else v for k, v in flat(config).items()}
        for summary in hparams(hp, {"val_loss": 0.0, "val_bpb": 0.0}):  # the HParams tab: settings against these curves
            self.w.file_writer.add_summary(summary)
        self.where = f"tensorboard --logdir {folder.parent}"

    def scalars(self, step, values):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def sample(self, step, prompt, text):
        self.w.add_text("sample", prompt + text, step)

    def event(self, step, kind, message):
        self.w.add_text("events", f"{kind}: {message}", step)

    def images(self, step, paths):
        from matplotlib.image import imread

        for key, p in paths.items():
            self.w.add_image(f"plots/{key}", imread(str(p))[..., :3], step, dataformats="HWC")

    def close(self, ok):
        self.w.close()


class WandB(Tracker):
    """Offline unless WANDB_MODE says otherwise; the project is $WANDB_PROJECT or gradlm."""

    name = "wandb"

    def __init__(self, folder: Path, name: str, config: dict, state: dict):
        super().__init__(folder, name, config, state)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        self.state = {"id": state.get("id") or secrets.token_hex(4)}
        settings = wandb.Settings(console="off", save_code=False, x_disable_stats=True)
        with quiet():
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "gradlm"),
                name=name,
                id=self.state["id"],
                dir=str(folder),
                mode=mode,
                config=config,
                resume="allow",
                settings=settings,
                reinit="create_new",
            )
        self.last = 0  # W&B's steps only go forward: an event at an earlier step is shown at the newest one
        self.Table, self.Image = wandb.Table, wandb.Image
        self.where = (
            f"wandb sync {folder}/wandb/offline-run-*-{self.state['id']}"
            if mode == "offline"
            else (self.run.url or "W&B")
        )

    def _log(self, step, data):
        self.last = max(self.last, step)
        self.run.log(data, step=self.last)

    def scalars(self, step, values):
        self._log(step, values)

    def sample(self, step, prompt, text):
        self._log(step, {"samples": self.Table(columns=["step", "prompt", "text"], data=[[step, prompt, text]])})

    def event(self, step, kind, message):
        self._log(step, {"events": self.Table(columns=["step", "event", "message"], data=[[step, kind, message]])})

    def images(self, step, paths):
        self._log(step, {f"plots/{k}": self.Image(str(p)) for k, p in paths.items()})

    def close(self, ok):
        with quiet():
            self.run.finish(exit_code=0 if ok else 1)


class MLflow(Tracker):
    """$MLFLOW_TRACKING_URI (a tracking server, a database) if set; else an SQLite store beside the run
    directory, in RUN/../mlflow/ (runs in one folder share it). The experiment is $MLFLOW_EXPERIMENT_NAME or gradlm."""

    name = "mlflow"

    def __init__(self, folder: Path, name: str, config: dict, state: dict):
        super().__init__(folder, name, config, state)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables...": not news to a user
            logging.getLogger(noisy).setLevel(logging.WARNING)

        local = folder.resolve().parent / "mlflow"
        uri = state.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        if uri == f"sqlite:///{local / 'mlflow.db'}":
            local.mkdir(parents=True, exist_ok=True)
        self.client = c = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id")
        if run_id:
            c.update_run(run_id, status="RUNNING")
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gradlm")
            exp = c.get_experiment_by_name(exp_name)
            if exp is None:
                try:  # artifacts beside the local store, not in the working directory
                    c.create_experiment(
                        exp_name,
                        artifact_location=(local / "artifacts").as_uri()
                        if uri.startswith("sqlite:///") and local.is_dir()
                        else None,
                    )
                except Exception:  # another process made it first
                    pass
                exp = c.get_experiment_by_name(exp_name)
            run_id = c.create_run(
                exp.experiment_id, run_name=name, tags={"gradlm.run_dir": str(folder.resolve())}
            ).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                c.log_batch(run_id, params=params[i : i + 100])
        self.run_id, self.events = run_id, 0
        self.state = {"uri": uri, "run_id": run_id}
        self.where = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"{uri} (run {run_id})"

    def scalars(self, step, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def sample(self, step, prompt, text):
        self.client.log_text(self.run_id, prompt + text, f"samples/step-{step:07d}.txt")

    def event(self, step, kind, message):  # MLflow has no events: a tag per event, in order
        self.events += 1
        self.client.set_tag(self.run_id, f"event.{step:07d}.{self.events:03d}.{kind}", message[:5000])

    def images(self, step, paths):
        for p in paths.values():
            self.client.log_artifact(self.run_id, str(p), "plots")

    def close(self, ok):
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class Trackio(Tracker):
    """trackio's local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio); the project is $TRACKIO_PROJECT or
    gradlm."""

    name = "trackio"

    def __init__(self, folder: Path, name: str, config: dict, state: dict):
        super().__init__(folder, name, config, state)
        import trackio

        self.project = os.environ.get("TRACKIO_PROJECT", "gradlm")
        name = name.strip("/").replace("/", "-")  # trackio files a run's images under its name: no folders in it
        with quiet():
            self.run = trackio.init(
                project=self.project,
                name=name,
                config=flat(config),
                resume="allow" if state else "never",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.state = {"project": self.project, "name": name}
        self.trackio = trackio
        self.where = f"trackio show --project {self.project}"

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def sample(self, step, prompt, text):
        self.run.log({"sample": self.trackio.Markdown(f"```\n{prompt}{text}\n```")}, step=step)

    def event(self, step, kind, message):
        with quiet():
            self.run.alert(
                title=kind,
                text=message,
                level=self.trackio.AlertLevel.WARN if kind in WARNINGS else self.trackio.AlertLevel.INFO,
            )

    def images(self, step, paths):
        self.run.log({f"plots/{k}": self.trackio.Image(str(p)) for k, p in paths.items()}, step=step)

    def close(self, ok):
        with quiet():
            self.trackio.finish()  # the module's: it also forgets the run (else it is finished again at exit, aloud)


KINDS = {c.name: c for c in (TensorBoard, WandB, MLflow, Trackio)}
WARNINGS = ("diverged", "overfitting", "variance", "stopped")


def display_name(folder: Path) -> str:
    """How a run is named in the trackers: its path from the working directory (runs/demo), else its absolute path."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder.resolve())


class Trackers:
    """The trackers of one run, fed with its rows as they are written.

    On a resume from step `since`: a tracker that followed the run before gets no row again up to `until`, the last
    step metrics.jsonl held before it was trimmed (the interrupted run sent those; an exact resume repeats them); a
    tracker new to the run is first given the run's history up to `since` (metrics.jsonl and samples.jsonl as kept)."""

    def __init__(
        self,
        names: list[str],
        folder: str | os.PathLike,
        config: dict,
        since: int = -1,
        until: int = -1,
        history: tuple[list[dict], list[dict]] = ([], []),
        log=print,
    ):
        self.folder, self.since = Path(folder), since
        path = self.folder / STATE_FILE
        try:
            saved = json.loads(path.read_text()) if since >= 0 and path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            saved = {}
        self.open: list[Tracker] = []
        self.until: dict[str, int] = {}
        try:
            for n in names:
                try:
                    self.open.append(KINDS[n](self.folder, display_name(self.folder), config, saved.get(n, {})))
                except Exception as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise GradlmError(
                        f"--logger {n}: could not start ({type(e).__name__}: {first}); check its settings, or leave "
                        "it out"
                    ) from None
                self.until[n] = until if n in saved else -1
        except BaseException:
            self.close(ok=False)
            raise
        if not self.open:
            return
        ckpt.atomic_write_json(path, {**saved, **{t.name: t.state for t in self.open}})
        log("logging to " + "; ".join(f"{t.name} ({t.where})" for t in self.open))
        new = [t for t in self.open if self.until[t.name] < 0]
        if new and since >= 0:  # --logger added on a resume: the run so far, first
            rows, samples = history
            for row in sorted(
                [(r, "metrics_row") for r in rows] + [(r, "sample_row") for r in samples],
                key=lambda x: x[0].get("step", 0),
            ):
                getattr(self, row[1])(row[0], only=new)

    def _each(self, what: str, *args, only: list[Tracker] | None = None) -> None:
        for t in list(only if only is not None else self.open):
            if t not in self.open:
                continue
            try:
                getattr(t, what)(*args)
            except Exception as e:  # a logger never stops training
                self.open.remove(t)
                print(
                    f"warning: --logger {t.name} failed ({type(e).__name__}: {e}); training goes on without it",
                    file=sys.stderr,
                )

    def _fresh(self, step: int) -> list[Tracker]:
        """The trackers that have not been given this step before."""
        return [t for t in self.open if step > self.until[t.name] or step <= self.since]

    def metrics_row(self, row: dict, only: list[Tracker] | None = None) -> None:
        """A row of metrics.jsonl: an event, or the numbers of a step or an evaluation."""
        step = int(row.get("step", 0))
        to = [t for t in self._fresh(step) if only is None or t in only]
        if "event" in row:
            self._each("event", step, row["event"], str(row.get("message", "")), only=to)
        else:
            self._each("scalars", step, numbers(row), only=to)

    def sample_row(self, row: dict, only: list[Tracker] | None = None) -> None:
        """A row of samples.jsonl: what the model wrote at an evaluation."""
        step = int(row.get("step", 0))
        to = [t for t in self._fresh(step) if only is None or t in only]
        self._each("sample", step, str(row.get("prompt", "")), str(row.get("text", "")), only=to)

    def images(self, step: int, paths: list[Path]) -> None:
        """The run's plots, at the end."""
        self._each("images", step, {Path(p).stem: Path(p) for p in paths if Path(p).is_file()})

    def close(self, ok: bool = True) -> None:
        open_, self.open = self.open, []
        for t in open_:
            try:
                t.close(ok)
            except Exception as e:
                print(f"warning: --logger {t.name} did not close cleanly ({type(e).__name__}: {e})", file=sys.stderr)
