"""--logger: what reaches TensorBoard, W&B, MLflow and trackio, read back with each one's own reader and compared
with metrics.jsonl and samples.jsonl; a resumed run continues the same tracked runs without a step twice."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradlm.training.config import TrainConfig
from gradlm.errors import ConfigError
from gradlm.model.transformer import ModelConfig
from gradlm.rundir import read_jsonl
from gradlm.training.trackers import parse_loggers
from gradlm.training.trainer import train

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("trackio")

ALL = "tensorboard,wandb,mlflow,trackio"
EXACT = ("loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s", "train_eval_loss")  # one value per step each


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """Every tracker offline; trackio's store is the session's (conftest sets TRACKIO_DIR before trackio is imported:
    it reads it once), each run in it named by its own folder."""
    monkeypatch.setenv("TRACKIO_PROJECT", "gradlm-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def tiny(tmp_path, corpus, **kw) -> tuple[ModelConfig, TrainConfig]:
    cfg = dict(
        data=str(corpus),
        out=str(tmp_path / "runs" / "a"),
        vocab_size=300,
        batch="4",
        max_steps=30,
        eval_every=10,
        log_every=5,
        eval_tokens=512,
        sample_tokens=8,
        warmup_steps=2,
        progress=False,
        device="cpu",
        dtype="float32",
        logger=ALL,
    )
    cfg.update(kw)
    return ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16), TrainConfig(**cfg)


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's numbers, {key: {step: value}}, for the keys with one value per step."""
    out: dict[str, dict[int, float]] = {}
    for row in read_jsonl(run / "metrics.jsonl"):
        for k in EXACT:
            if k in row and "event" not in row:
                out.setdefault(k, {})[row["step"]] = row[k]
    return out


# ---- each tracker's own reader


def read_tensorboard(run: Path) -> tuple[dict, list[str], list[str], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in tags["scalars"]}

    def texts(tag):
        return (
            [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)]
            if tag in tags["tensors"]
            else []
        )

    return scalars, texts("sample/text_summary"), texts("events/text_summary"), tags["images"]


def wandb_records(path: Path):
    """The records of a W&B offline run file (.wandb): W&B's protobuf Records in LevelDB's log framing."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, part = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield pb.Record.FromString(part)
            part = b""


def read_wandb(run: Path) -> tuple[dict, dict, list[dict]]:
    """(the history as {key: [(step, value)]}, the config, the tables logged) of every offline run of this run's id."""
    rid = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    scalars: dict[str, list] = {}
    config, tables = {}, []
    for d in sorted((run / "wandb").glob(f"offline-run-*-{rid}")):
        for r in wandb_records(next(d.glob("*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row: dict = {}
                # a logged object (a table, an image) comes as one item per field: samples/_type, ...
                for i in r.history.item:
                    *outer, last = [i.key] if i.key else list(i.nested_key)
                    at = row
                    for k in outer:
                        at = at.setdefault(k, {})
                    at[last] = json.loads(i.value_json)
                step = row.pop("_step")
                for k, v in row.items():
                    if isinstance(v, dict) and v.get("_type") == "table-file":
                        tables.append({"key": k, "step": step, **json.loads((d / "files" / v["path"]).read_text())})
                    elif isinstance(v, (int, float)) and not k.startswith("_"):
                        scalars.setdefault(k, []).append((step, v))
            elif kind in ("run", "config"):  # the settings come with the run record (and any later config record)
                updates = r.run.config.update if kind == "run" else r.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
    return scalars, config, tables


def read_mlflow(run: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    c = MlflowClient(tracking_uri=state["uri"])
    r = c.get_run(state["run_id"])
    scalars = {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}
    samples = [c.download_artifacts(r.info.run_id, a.path) for a in c.list_artifacts(r.info.run_id, "samples")]
    plots = [a.path for a in c.list_artifacts(r.info.run_id, "plots")]
    return scalars, r.data.params, [Path(p).read_text() for p in samples], r.data.tags, plots, r.info.status


def read_trackio(run: Path):
    from trackio.sqlite_storage import SQLiteStorage

    state = json.loads((run / "trackers.json").read_text())["trackio"]
    logs = SQLiteStorage.get_logs(state["project"], state["name"])
    scalars: dict[str, list] = {}
    for row in logs:
        for k, v in row.items():
            if k not in ("step", "timestamp") and isinstance(v, (int, float)):
                scalars.setdefault(k, []).append((row["step"], v))
    samples = [row["sample"]["_value"] for row in logs if "sample" in row]
    config = SQLiteStorage.get_run_config(state["project"], state["name"])
    alerts = SQLiteStorage.get_alerts(state["project"], state["name"])
    return scalars, samples, config, alerts, [k for row in logs for k in row if k.startswith("plots/")]


def assert_same(got: dict[str, list], want: dict[str, dict[int, float]], who: str, clock: bool = True) -> None:
    """Each key of metrics.jsonl at the same steps, once each, with the same values (clock=False: except the speed,
    which a resume that repeats steps measures again)."""
    for k, points in want.items():
        steps = [s for s, _ in got.get(k, [])]
        assert sorted(steps) == sorted(points), (
            f"{who}: {k} at steps {sorted(steps)}, metrics.jsonl has {sorted(points)}"
        )
        if k == "tokens_per_s" and not clock:
            continue
        for s, v in got[k]:
            assert v == pytest.approx(points[s], rel=1e-6, abs=1e-9), f"{who}: {k} at step {s}"


def test_every_tracker_receives_what_metrics_jsonl_holds(tmp_path, tracker_env, text_file):
    model_cfg, cfg = tiny(tmp_path, text_file)
    train(model_cfg, cfg)
    run = Path(cfg.out)
    want = expected(run)
    samples = read_jsonl(run / "samples.jsonl")
    assert set(want) >= {"loss", "val_loss", "lr"} and len(samples) == 3

    scalars, texts, events, images = read_tensorboard(run)
    assert_same(scalars, want, "tensorboard")
    assert texts == [s["prompt"] + s["text"] for s in samples]
    assert any(e.startswith("stopped:") for e in events) and "plots/training" in images

    scalars, config, tables = read_wandb(run)
    assert_same(scalars, want, "wandb")
    saved = json.loads((run / "config.json").read_text())
    assert config["train"] == saved["train"] and config["model"] == saved["model"]
    assert [t["data"][0][2] for t in tables if t["key"] == "samples"] == [s["text"] for s in samples]
    assert any(t["data"][0][1] == "stopped" for t in tables if t["key"] == "events")

    scalars, params, texts, tags, plots, status = read_mlflow(run)
    assert_same(scalars, want, "mlflow")
    assert float(params["train.lr"]) == saved["train"]["lr"] and params["model.d_model"] == "32"
    assert texts == [s["prompt"] + s["text"] for s in samples]
    assert any(k.endswith(".stopped") for k in tags) and plots == ["plots/training.png"] and status == "FINISHED"

    scalars, texts, config, alerts, plots = read_trackio(run)
    assert_same(scalars, want, "trackio")
    assert texts == [f"```\n{s['prompt']}{s['text']}\n```" for s in samples]
    assert config["train.optimizer"] == "adamw" and any(a["title"] == "stopped" for a in alerts) and plots


def test_a_resume_continues_each_tracked_run_without_a_step_twice(tmp_path, tracker_env, text_file):
    """The first run crashes at step 27, after its checkpoint at 20: the trackers hold steps up to 25. The resume
    from 20 repeats 21-27 exactly; each tracker must end with every step once, equal to the finished metrics.jsonl."""
    model_cfg, cfg = tiny(tmp_path, text_file)

    def crash(step, loss, lr):
        if step == 27:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(model_cfg, cfg, on_step=crash)
    run = Path(cfg.out)
    first = json.loads((run / "trackers.json").read_text())
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) > 20
    train(model_cfg, TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert json.loads((run / "trackers.json").read_text()) == first  # the same tracked runs
    want = expected(run)
    assert max(want["loss"]) == 30
    assert_same(read_tensorboard(run)[0], want, "tensorboard", clock=False)
    assert_same(read_wandb(run)[0], want, "wandb", clock=False)
    assert_same(read_mlflow(run)[0], want, "mlflow", clock=False)
    assert_same(read_trackio(run)[0], want, "trackio", clock=False)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # W&B offline: one folder per invocation, one run id


def test_a_logger_added_on_resume_gets_the_run_so_far(tmp_path, tracker_env, text_file):
    model_cfg, cfg = tiny(tmp_path, text_file, logger="", pause_at=20)
    train(model_cfg, cfg)
    train(model_cfg, TrainConfig(**{**cfg.__dict__, "resume": True, "pause_at": 0, "logger": "tensorboard"}))
    run = Path(cfg.out)
    assert_same(read_tensorboard(run)[0], expected(run), "tensorboard")


def test_lr_find_and_compare_log_too(tmp_path, tracker_env, text_file):
    from gradlm.training.compare import compare
    from gradlm.training.lrfind import lr_find

    model_cfg, cfg = tiny(tmp_path, text_file, logger="tensorboard", max_steps=12)
    r = lr_find(model_cfg, cfg, steps=20, out=tmp_path / "lr", png=tmp_path / "lr" / "lr_find.png", log=lambda m: None)
    scalars = read_tensorboard(tmp_path / "lr")[0]
    assert [v for _, v in scalars["lr"]] == pytest.approx(r["lrs"]) and [
        v for _, v in scalars["loss"]
    ] == pytest.approx(r["losses"])
    with pytest.raises(ConfigError, match="add --out"):
        lr_find(model_cfg, cfg, steps=20, log=lambda m: None)
    compare(model_cfg, cfg, [{"optimizer": "sgd"}, {"optimizer": "adamw"}], tmp_path / "cmp", log=lambda m: None)
    for sub in ("optimizer-sgd", "optimizer-adamw"):
        assert_same(read_tensorboard(tmp_path / "cmp" / sub)[0], expected(tmp_path / "cmp" / sub), sub)


def test_a_logger_that_fails_mid_run_is_dropped_and_training_goes_on(
    tmp_path, tracker_env, text_file, monkeypatch, capsys
):
    from gradlm.training import trackers

    def broken(self, step, values):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(trackers.MLflow, "scalars", broken)
    model_cfg, cfg = tiny(tmp_path, text_file, logger="mlflow,tensorboard")
    s = train(model_cfg, cfg)
    assert s["steps"] == 30
    assert capsys.readouterr().err.count("--logger mlflow failed") == 1
    assert_same(read_tensorboard(Path(cfg.out))[0], expected(Path(cfg.out)), "tensorboard")


def test_bad_loggers_are_one_line_and_write_nothing(tmp_path, text_file, monkeypatch):
    with pytest.raises(ConfigError, match="'neptune' is not a tracker gradlm logs to; choose from tensorboard"):
        parse_loggers("tensorboard,neptune")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the wandb package.*pip install 'gradlm\[wandb\]'"):
        parse_loggers("wandb")
    monkeypatch.undo()
    out = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlm",
            "train",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--max-steps",
            "5",
            "--logger",
            "tensorbord",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode == 2
        and p.stderr.count("\n") == 1
        and "Traceback" not in p.stderr
        and "'tensorbord' is not a tracker" in p.stderr
    )
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run(tmp_path, text_file):
    out = tmp_path / "run"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": "nosuchstore://nowhere"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlm",
            "train",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--max-steps",
            "5",
            "--logger",
            "tensorboard,mlflow",
            "--n-layer",
            "1",
            "--d-model",
            "32",
            "--n-head",
            "2",
            "--block-size",
            "16",
            "--vocab-size",
            "300",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and "--logger mlflow: could not start" in p.stderr and "Traceback" not in p.stderr, (
        p.stderr
    )
    assert not out.exists()
