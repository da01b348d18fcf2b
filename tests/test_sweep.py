"""gradlm sweep: the search space from flags, trials as runs, the study in an Optuna storage (resumable after
kill -9, shared by two workers), results (table, best config, plots), and bad input in one line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import start_gradlm, wait_for_step
from gradlm.training.config import TrainConfig, read_config_file
from gradlm.errors import ConfigError
from gradlm.model.transformer import ModelConfig
from gradlm.training.sweep import Param, parse_space, sweep
from gradlm.training.trainer import train

TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--d-model",
    "32",
    "--block-size",
    "16",
    "--vocab-size",
    "300",
    "--eval-tokens",
    "512",
    "--sample-tokens",
    "0",
    "--warmup-steps",
    "2",
    "--no-plots",
    "--dtype",
    "float32",
]


def configs(text_file, out, **kw):
    cfg = dict(
        data=str(text_file),
        out=str(out),
        vocab_size=300,
        max_steps=20,
        eval_every=10,
        eval_tokens=512,
        sample_tokens=0,
        warmup_steps=2,
        progress=False,
        plots=False,
        device="cpu",
        dtype="float32",
    )
    cfg.update(kw)
    return ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16), TrainConfig(**cfg)


def study_of(out: Path):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def run_sweep(*args, out: Path, wait=True, **popen):
    if not wait:
        return start_gradlm("sweep", "--out", out, *args, **popen)
    return subprocess.run(
        [sys.executable, "-m", "gradlm", "sweep", "--out", str(out), *args], capture_output=True, text=True
    )


# ---- the search space


def test_the_space_reads_lists_ranges_log_ranges_and_steps():
    space = {
        p.name: p
        for p in parse_space(
            [
                "lr=1e-4..3e-2:log",
                "batch=8,16,32",
                "optimizer=adamw,muon",
                "d-model=128..384:64",
                "dropout=0..0.2",
                "qk-norm=true,false",
                "vocab-size=512,1024",
            ]
        )
    }
    assert space["lr"] == Param("lr", "train", float, low=1e-4, high=3e-2, log=True)
    assert space["batch"].choices == ["8", "16", "32"] and space["optimizer"].choices == ["adamw", "muon"]
    assert (
        space["d_model"].section == "model"
        and space["d_model"].kind is int
        and space["d_model"].grid() == [128, 192, 256, 320, 384]
    )
    assert space["dropout"].low == 0 and space["dropout"].high == 0.2 and not space["dropout"].log
    assert space["qk_norm"].choices == [True, False]
    assert space["vocab_size"].section == "train"  # the tokenizer's size, which sets the model's
    assert parse_space(["batch=8..64:8"])[0].grid() == [8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize(
    "item, message",
    [
        ("learning-rate=1..2", "learning-rate: not a training or model setting"),
        ("max-time=10s,20s", "says where or how long a trial runs"),
        ("lr=0.1..0.01", "the range is empty"),
        ("lr=0.01..0.01", "the range is empty"),
        ("lr=0..0.1:log", "a log range must be above 0"),
        ("lr=a..b", "'a' is not a float"),
        ("n-layer=1.5..4", "is a whole number"),
        ("optimizer=1..3", "takes values, not a range"),
        ("lr", "write NAME=SPEC"),
        ("batch=8,,16", "an empty value"),
        ("batch=8,8", "listed twice"),
        ("d-model=128..384:0", "the step must be above 0"),
    ],
)
def test_a_bad_space_is_one_clear_error(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_space([item])


def test_a_value_that_cannot_train_is_refused_before_any_trial(tmp_path, text_file):
    model_cfg, cfg = configs(text_file, tmp_path / "s")
    with pytest.raises(ConfigError, match="optimizer: the value adamm cannot train"):
        sweep(model_cfg, cfg, parse_space(["optimizer=adamw,adamm"]), tmp_path / "s", trials=2, log=lambda m: None)
    with pytest.raises(ConfigError, match="d-model: the value 33 cannot train"):  # 33 is not a multiple of the 2 heads
        sweep(model_cfg, cfg, parse_space(["d-model=32..33"]), tmp_path / "s", trials=2, log=lambda m: None)
    with pytest.raises(ConfigError, match="continuous range"):
        sweep(
            model_cfg,
            cfg,
            parse_space(["lr=1e-3..1e-2:log"]),
            tmp_path / "s",
            trials=2,
            sampler="grid",
            log=lambda m: None,
        )
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--search", "lrr=1..2"], "lrr: not a training or model setting"),
        (["--search", "lr=0..0.1:log"], "a log range must be above 0"),
        (
            ["--search", "lr=1e-3..1e-2", "--storage", "nosuchdb://nowhere/x"],
            "--storage nosuchdb://nowhere/x: cannot open it as an Optuna storage",
        ),
        (["--search", "lr=1e-3..1e-2", "--logger", "tensorbord"], "'tensorbord' is not a tracker"),
        (["--search", "lr=1e-3..1e-2", "--trials", "0"], "--trials must be at least 1"),
    ],
)
def test_bad_input_to_the_command_is_one_line_exit_2_and_nothing_written(tmp_path, text_file, args, message):
    p = run_sweep("--data", str(text_file), "--max-steps", "5", *TINY, *args, out=tmp_path / "s")
    assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (
        p.stderr
    )
    assert not (tmp_path / "s").exists()


def test_a_sweep_needs_a_budget_per_trial(tmp_path, text_file):
    model_cfg, cfg = configs(text_file, tmp_path / "s", max_steps=0)
    with pytest.raises(ConfigError, match="give every trial one budget"):
        sweep(model_cfg, cfg, parse_space(["lr=1e-3..1e-2"]), tmp_path / "s", log=lambda m: None)


# ---- trials, results


def test_every_trial_is_a_run_and_the_best_config_trains_the_best_trial_again(tmp_path, text_file):
    out = tmp_path / "s"
    model_cfg, cfg = configs(text_file, out)
    r = sweep(
        model_cfg,
        cfg,
        parse_space(["lr=1e-3..3e-2:log", "batch=8,32"]),
        out,
        trials=5,
        sampler="random",
        pruner="none",
        log=lambda m: None,
    )
    study = study_of(out)
    assert len(study.trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        summary = json.loads((out / f"trial-{t.number:04d}" / "summary.json").read_text())
        assert summary["val_bpb"] == t.value and summary["steps"] == 20
        saved = json.loads((out / f"trial-{t.number:04d}" / "config.json").read_text())["train"]
        assert saved["lr"] == t.params["lr"] and str(saved["batch"]) == t.params["batch"]
    # trial 0 is the default: what `gradlm train` with the same flags uses for the searched settings
    plain = json.loads(
        (
            Path(train(model_cfg, TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "plain")}))["run"])
            / "config.json"
        ).read_text()
    )
    assert study.trials[0].user_attrs["default"] and study.trials[0].params == {
        "lr": plain["train"]["lr"],
        "batch": str(plain["train"]["batch"]),
    }
    assert "the default" in (out / "trials.md").read_text()
    best = min(study.trials, key=lambda t: t.value)
    assert r["best"]["trial"] == best.number and r["best"]["val_bpb"] == best.value
    assert len((out / "trials.md").read_text().splitlines()) >= 2 + 5
    assert {Path(p).name for p in r["plots"]} == {"history.png", "importance.png", "sensitivity.png"}
    # the best trial's settings, as --config, train the same model to the same loss
    values = read_config_file(out / "best_config.json", (ModelConfig, TrainConfig))
    assert "out" not in values and values["size"] == "fixed"
    m = ModelConfig(**{k: v for k, v in values.items() if k in ModelConfig.__dataclass_fields__})
    t = TrainConfig(
        **{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__}, out=str(tmp_path / "again")
    )
    assert train(m, t)["val_bpb"] == pytest.approx(best.value, rel=1e-6)


def test_a_grid_visits_every_combination_once(tmp_path, text_file):
    out = tmp_path / "g"
    model_cfg, cfg = configs(text_file, out, max_steps=10)
    sweep(
        model_cfg,
        cfg,
        parse_space(["batch=4,8", "optimizer=sgd,adamw"]),
        out,
        trials=10,
        sampler="grid",
        log=lambda m: None,
    )
    combos = sorted((t.params["batch"], t.params["optimizer"]) for t in study_of(out).trials)
    assert combos == [("4", "adamw"), ("4", "sgd"), ("8", "adamw"), ("8", "sgd")]


def test_a_trial_stopped_at_an_evaluation_is_saved_there_as_pruned(tmp_path, text_file):
    model_cfg, cfg = configs(text_file, tmp_path / "p", max_steps=40)
    seen = []
    s = train(
        model_cfg, cfg, on_eval=lambda step, progress, ev: seen.append((step, progress, ev["val_bpb"])) or step >= 20
    )
    assert (
        s["stop"] == "pruned"
        and s["steps"] == 20
        and [x[0] for x in seen] == [10, 20]
        and seen[-1][1] == pytest.approx(0.5)
    )
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["stop"] == "pruned"


def test_a_diverging_trial_fails_alone_and_counts(tmp_path, text_file):
    out = tmp_path / "d"
    model_cfg, cfg = configs(text_file, out, optimizer="sgd", guard_retries=0, max_steps=10, grad_clip=0.0)
    sweep(model_cfg, cfg, parse_space(["lr=1e-3,1e6"]), out, trials=2, sampler="grid", log=lambda m: None)
    states = {t.params["lr"]: (t.state, t.user_attrs.get("status")) for t in study_of(out).trials}
    assert states == {1e-3: (optuna.trial.TrialState.COMPLETE, None), 1e6: (optuna.trial.TrialState.FAIL, "diverged")}
    assert "| diverged |" in (out / "trials.md").read_text()


# ---- the study: resumed after kill -9, shared by two workers


def test_a_killed_sweep_resumes_and_its_dead_trial_is_failed_not_lost(tmp_path, text_file):
    out = tmp_path / "k"
    args = [
        "--data",
        str(text_file),
        "--max-steps",
        "400",
        "--eval-every",
        "50",
        *TINY,
        "--search",
        "lr=1e-3..1e-2:log",
        "--trials",
        "2",
        "--search-sampler",
        "random",
        "--pruner",
        "none",
    ]
    p = run_sweep(*args, out=out, wait=False)
    wait_for_step(out / "trial-0000", 50, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # the same command (a shorter budget only to keep the test short)
    again = run_sweep(*args[:3], "60", *args[4:], out=out)
    assert again.returncode == 0, again.stderr
    assert "trials 0 died with the process that ran them" in again.stderr
    trials = study_of(out).trials
    assert [(t.number, t.state) for t in trials] == [
        (0, optuna.trial.TrialState.FAIL),
        (1, optuna.trial.TrialState.COMPLETE),
        (2, optuna.trial.TrialState.COMPLETE),
    ]
    assert "| 0 | died |" in (out / "trials.md").read_text()


def test_two_workers_share_one_sqlite_study(tmp_path, text_file):
    out = tmp_path / "w"
    args = [
        "--data",
        str(text_file),
        "--max-steps",
        "60",
        "--eval-every",
        "20",
        *TINY,
        "--search",
        "lr=1e-3..1e-2:log",
        "batch=4,8",
        "--trials",
        "6",
        "--pruner",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [run_sweep(*args, out=out, wait=False, env=env) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    trials = study_of(out).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # each worker stops once the study holds 6 (one may have started its last as the other did)
    assert 6 <= len(done) <= 7
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both worked on it
    for t in done:
        assert (out / f"trial-{t.number:04d}" / "summary.json").is_file()


def test_a_default_outside_the_space_is_said_and_not_tried(tmp_path, text_file):
    out, said = tmp_path / "o", []
    model_cfg, cfg = configs(text_file, out, max_steps=10)  # the flags' batch is 32
    sweep(model_cfg, cfg, parse_space(["batch=4,8"]), out, trials=1, log=said.append)
    assert any("lies outside the space: it is not one of the trials" in m for m in said)
    assert "default" not in study_of(out).trials[0].user_attrs
