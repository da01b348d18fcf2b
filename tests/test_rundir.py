"""The run directory's one owner: layering, honest resume, reproducible files, and nothing lost on a crash,
a signal, a second writer or a full disk."""

import errno
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from gradlm import files as ckpt
from gradlm.training.config import TrainConfig
from gradlm.errors import ConfigError, RunDirError
from gradlm.training.optim import base_lrs, set_lr
from gradlm.rundir import RunDir, load_model, read_metrics
from gradlm.training.trainer import Trainer, train

from conftest import kill_and_resume, start_gradlm, tiny_config, wait_for_step

TINY = [
    "--block-size",
    "32",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--d-model",
    "32",
    "--batch",
    "8",
    "--eval-tokens",
    "1024",
    "--no-progress",
    "--no-plots",
]


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, timeout=300, **kw
    )


def cfg_for(prepared, tmp_path, name="run", **kw):
    base = dict(
        data=str(prepared),
        out=str(tmp_path / name),
        batch="8",
        max_steps=8,
        eval_every=4,
        eval_tokens=1024,
        warmup_steps=0,
        seed=0,
        progress=False,
        plots=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---- layering ---------------------------------------------------------------------------------------


def test_loading_sampling_evaluating_and_exporting_never_import_the_trainer_or_the_compiler(prepared, tmp_path, tok):
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=2))
    code = f"""
import sys
import gradlm
from gradlm import load_lm, load_model, evaluate_text
lm = load_lm({str(tmp_path / "run")!r})
lm.generate("a", max_new_tokens=3, temperature=0)
model, tok = load_model({str(tmp_path / "run")!r})
evaluate_text(model, tok, "some text to score")
from gradlm.formats.hf import export_hf
export_hf({str(tmp_path / "run")!r}, {str(tmp_path / "hf")!r})
bad = [m for m in ("gradlm.training.trainer", "gradlm.training.compare", "gradlm.training.lrfind") if m in sys.modules]
# nor torch's compiler (~2.5 s of a command's start: llguidance.torch compiles a function as it is imported,
# torch.compiler.disable imports dynamo)
bad += [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
print("imported:", bad)
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_public_api_names_resolve_lazily():
    import gradlm

    assert callable(gradlm.train) and gradlm.TrainConfig().optimizer == "adamw"
    assert gradlm.load_model is load_model
    with pytest.raises(AttributeError):
        gradlm.no_such_name  # noqa: B018


# ---- resume: typed flags override, the rest is the run's --------------------------------------------

# The first run uses non-default values, so "not given -> the saved value" differs from "the default".
SAVED = dict(
    lr=2e-3,
    weight_decay=0.05,
    beta1=0.8,
    beta2=0.9,
    grad_clip=0.5,
    eval_every=4,
    eval_tokens=1024,
    log_every=3,
    patience=7,
    min_delta=0.01,
    guard_retries=5,
    micro_batch=8,
    snapshots=2,
    dtype="float32",
    plots=False,
    progress=False,
)


def _group(t, label="lr", decay=True):
    return next(g for g in t.opt.param_groups if g.get("label", "lr") == label and g.get("decay", True) == decay)


def _lr_used(t, label="lr"):
    """The learning rate the optimizer really applies at the next step (base lr x schedule factor)."""
    return set_lr(t.opt, t.budget.lr_factor())[label]


# flag -> (value typed on resume, how to read what the resumed trainer really uses)
OVERRIDES = {
    "lr": (1e-3, lambda t: _lr_used(t) / t.budget.lr_factor()),
    "weight_decay": (0.2, lambda t: _group(t)["weight_decay"]),
    "beta1": (0.7, lambda t: _group(t)["betas"][0]),
    "beta2": (0.99, lambda t: _group(t)["betas"][1]),
    "grad_clip": (2.0, lambda t: t.cfg.grad_clip),
    "eval_every": (2, lambda t: t.cfg.eval_every),
    "eval_tokens": (512, lambda t: t.cfg.eval_tokens),
    "log_every": (1, lambda t: t.cfg.log_every),
    "patience": (2, lambda t: t.cfg.patience),
    "min_delta": (0.5, lambda t: t.cfg.min_delta),
    "guard_retries": (1, lambda t: t.cfg.guard_retries),
    "micro_batch": (4, lambda t: t.micro),
    "snapshots": (5, lambda t: t.cfg.snapshots),
    "max_steps": (12, lambda t: t.cfg.max_steps),
    "plots": (True, lambda t: t.cfg.plots),
    "progress": (True, lambda t: t.cfg.progress),
    "dtype": ("bfloat16", lambda t: t.compute_dtype),
}


@pytest.fixture
def paused(prepared, tmp_path, tok):
    s = train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, pause_at=4, **SAVED))
    assert s["stop"] == "paused"
    return tmp_path / "run"


@pytest.mark.parametrize("flag", sorted(OVERRIDES))
def test_each_overridable_flag_takes_effect_when_typed_and_not_otherwise(paused, prepared, tmp_path, tok, flag):
    value, used = OVERRIDES[flag]
    resume = dict(data=str(prepared), out=str(paused), resume=True)
    t = Trainer(
        tiny_config(tok.vocab_size), TrainConfig(**resume, **{flag: value}), given={flag, "data", "out", "resume"}
    ).build()
    assert used(t) == pytest.approx(value), flag
    t.close_run_dir()  # a resumed Trainer holds the run's lock until closed (or dropped)
    t = Trainer(
        tiny_config(tok.vocab_size), TrainConfig(**resume, **{flag: value}), given={"data", "out", "resume"}
    ).build()
    saved = SAVED.get(flag, TrainConfig(max_steps=8).max_steps if flag == "max_steps" else None)
    assert used(t) == pytest.approx(saved), flag  # not typed: the run's own value, not the flag object's


def test_muon_and_momentum_learning_rates_apply_to_their_own_groups(prepared, tmp_path, tok):
    for opt, flag, label in (("muon", "muon_lr", "lr_muon"), ("momentum", "momentum", "lr")):
        name = f"run-{opt}"
        train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, name=name, optimizer=opt, pause_at=2))
        t = Trainer(
            tiny_config(tok.vocab_size),
            cfg_for(prepared, tmp_path, name=name, optimizer=opt, resume=True, **{flag: 0.5}),
            given={flag},
        ).build()
        g = next(g for g in t.opt.param_groups if g["label"] == label)
        assert (g["base_lr"] if flag == "muon_lr" else g["momentum"]) == 0.5
        if opt == "muon":  # the other group keeps the run's own lr
            assert base_lrs(t.opt)["lr"] == 3e-3


def test_cli_resume_lr_is_used_logged_and_recorded(text_file, tmp_path):
    out = tmp_path / "run"
    r = cli(
        "train",
        "--data",
        text_file,
        "--out",
        out,
        "--vocab-size",
        300,
        "--max-steps",
        40,
        "--pause-at",
        20,
        "--lr",
        3e-3,
        "--schedule",
        "constant",
        "--warmup-steps",
        0,
        "--log-every",
        1,
        "--eval-every",
        20,
        *TINY,
    )
    assert r.returncode == 0, r.stderr
    r = cli("train", "--out", out, "--resume", "--lr", 1e-3, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "lr 0.001" in r.stderr and "--lr: 0.003 -> 0.001" in r.stderr
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3
    lrs = {row["step"]: row["lr"] for row in read_metrics(out) if "lr" in row}
    assert lrs[20] == pytest.approx(3e-3) and lrs[21] == pytest.approx(1e-3) and lrs[40] == pytest.approx(1e-3)
    r = cli("train", "--out", out, "--resume", "--max-steps", 45, "--no-progress")  # lr not typed: stays 1e-3
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3


@pytest.mark.parametrize(
    "given, message",
    [
        ({"optimizer": "sgd"}, "--optimizer sgd cannot change on --resume"),
        ({"batch": "4"}, "--batch 4 cannot change"),
        ({"seed": 3}, "--seed 3 cannot change"),
        ({"schedule": "wsd"}, "--schedule wsd cannot change"),
        ({"vocab_size": 500}, "--vocab-size 500 cannot change"),
    ],
)
def test_flags_that_cannot_apply_to_a_run_in_progress_are_refused_by_name(paused, prepared, tok, given, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(
            tiny_config(tok.vocab_size),
            TrainConfig(data=str(prepared), out=str(paused), resume=True, **given),
            given=set(given),
        ).build()


def test_model_shape_flags_are_refused_on_resume(paused, prepared, tok):
    with pytest.raises(ConfigError, match="--n-layer 3 cannot change on --resume"):
        Trainer(
            tiny_config(tok.vocab_size, n_layer=3),
            TrainConfig(data=str(prepared), out=str(paused), resume=True),
            given={"n_layer"},
        ).build()


def test_a_spent_budget_is_an_error_not_a_silent_exit(prepared, tmp_path, tok):
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=6))
    with pytest.raises(ConfigError, match="has finished its budget.*--max-steps 12"):
        train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=6, resume=True))
    with pytest.raises(ConfigError, match="--max-steps 4 is already spent"):
        train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=4, resume=True), given={"max_steps"})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear"])
def test_extending_a_run_warms_the_learning_rate_up_again_without_a_jump(prepared, tmp_path, tok, schedule):
    kw = dict(schedule=schedule, log_every=1, decay_fraction=0.5)
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=10, pause_at=6, **kw))
    train(
        tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=30, resume=True, **kw), given={"max_steps"}
    )
    lrs = [r["lr"] for r in sorted((r for r in read_metrics(tmp_path / "run") if "lr" in r), key=lambda r: r["step"])]
    assert len(lrs) == 30
    peak, warmup = 3e-3, 24 // 5  # the phase warms over a fifth of its 24 steps at most
    top = lrs.index(max(lrs[6:]), 6)
    # climbs from where it was (wsd: at the peak) ...
    assert all(a <= b * (1 + 1e-9) for a, b in zip(lrs[5:top], lrs[6 : top + 1])), lrs
    # ... in even steps, no jump
    assert all(b - a <= (peak - lrs[5]) / warmup * 1.001 for a, b in zip(lrs[5:top], lrs[6 : top + 1]))
    assert top - 5 <= warmup and max(lrs) == pytest.approx(peak, rel=0.02)  # back at the run's peak within the warmup
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lrs[top:], lrs[top + 1 :])), lrs  # then decays over the new budget
    assert 3e-3 * 0.1 <= lrs[-1] <= 0.35 * peak  # towards (never below) the floor


def test_extending_a_finished_run_trains_at_the_typed_lr_or_the_runs_peak(text_file, tmp_path):
    """The README's "extend it" line after a run that decayed to 0: the new phase trains at a real learning rate."""
    out = tmp_path / "run"
    first = cli(
        "train",
        "--data",
        text_file,
        "--out",
        out,
        "--vocab-size",
        300,
        "--max-steps",
        10,
        "--eval-every",
        5,
        "--lr",
        3e-3,
        "--min-lr-ratio",
        0,
        "--warmup-steps",
        2,
        "--log-every",
        1,
        *TINY,
    )
    assert first.returncode == 0, first.stderr
    rows = lambda: sorted((r for r in read_metrics(out) if "lr" in r), key=lambda r: r["step"])  # noqa: E731
    assert rows()[-1]["lr"] < 3e-4  # decayed nearly to 0
    typed = cli("train", "--out", out, "--resume", "--max-steps", 30, "--lr", 1e-3, "--no-progress")
    assert typed.returncode == 0, typed.stderr
    assert "to 0.001 (--lr)" in typed.stderr
    after = [r["lr"] for r in rows() if r["step"] > 10]
    # warms to the typed --lr (the cosine has begun), decays over the new budget
    assert max(after) == pytest.approx(1e-3, rel=0.1) and after[-1] < 1e-4
    again = cli("train", "--out", out, "--resume", "--max-steps", 60, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "(the run's peak)" in again.stderr
    # the peak the run now has: the typed one
    assert max(r["lr"] for r in rows() if r["step"] > 30) == pytest.approx(1e-3, rel=0.1)
    assert RunDir(out).read_config()["train"]["lr"] == pytest.approx(1e-3)


def test_from_best_resumes_the_best_checkpoint_exactly(prepared, tmp_path, tok):
    # min_delta 10: only the first evaluation counts as an improvement, so best (step 4) != latest (step 8)
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=8, eval_every=4, min_delta=10.0))
    run = RunDir(tmp_path / "run")
    assert int(ckpt.weights_metadata(run.best)["step"]) == 4 and int(ckpt.weights_metadata(run.weights)["step"]) == 8
    t = Trainer(
        tiny_config(tok.vocab_size),
        cfg_for(prepared, tmp_path, max_steps=16, resume=True, from_best=True),
        given={"max_steps"},
    ).build()
    assert t.step == 4 and t.tokens_seen == 4 * 8 * 32
    best = ckpt.load_weights(run.best)
    assert all(torch.equal(v, best[k]) for k, v in t.model.state_dict().items() if k in best)
    t.close_run_dir()
    s = train(
        tiny_config(tok.vocab_size),
        cfg_for(prepared, tmp_path, max_steps=8, resume=True, from_best=True, min_delta=10.0),
    )
    assert s["steps"] == 8  # steps 5..8 again, from the best checkpoint
    with pytest.raises(ConfigError, match="--from-best only applies with --resume"):
        Trainer(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, name="other", from_best=True)).build()


# ---- reproducible files -----------------------------------------------------------------------------


def test_equal_weights_give_equal_bytes(tmp_path):
    state = {"b": torch.ones(3), "a": torch.arange(4.0), "c": torch.zeros(2, dtype=torch.bfloat16)}
    code = f"""
import torch
from gradlm import files as ckpt
state = {{"b": torch.ones(3), "a": torch.arange(4.0), "c": torch.zeros(2, dtype=torch.bfloat16)}}
ckpt.save_weights({str(tmp_path / "y.safetensors")!r}, dict(reversed(state.items())), {{"step": "3"}})
"""
    ckpt.save_weights(tmp_path / "x.safetensors", state, {"step": "3"})
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # another process: another hash seed
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    with pytest.raises(ValueError):  # several metadata keys would come out in a per-process order
        ckpt.save_weights(tmp_path / "z.safetensors", state, {"step": "3", "reason": "eval"})


def test_resume_reads_the_same_prepared_cache(text_file, tmp_path, tok):
    cfg = dict(
        data=str(text_file),
        out=str(tmp_path / "run"),
        vocab_size=300,
        batch="8",
        max_steps=4,
        eval_every=2,
        eval_tokens=512,
        progress=False,
        plots=False,
    )
    train(tiny_config(300), TrainConfig(**cfg, pause_at=2))
    cache = tmp_path / "cache" / "prepared"
    first = sorted(p.name for p in cache.iterdir())
    train(tiny_config(300), TrainConfig(**cfg, resume=True))
    assert sorted(p.name for p in cache.iterdir()) == first and len(first) == 1


# ---- nothing lost -----------------------------------------------------------------------------------


def _start(args, **kw):
    return start_gradlm(*args, **kw)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(prepared, tmp_path, sig, code):
    run = tmp_path / "run"
    p = _start(
        [
            "train",
            "--data",
            prepared,
            "--out",
            run,
            "--max-steps",
            100000,
            "--eval-every",
            100000,
            "--log-every",
            1,
            *TINY,
        ]
    )
    wait_for_step(run, 3, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert f"gradlm train --out {run} --resume" in err and "Traceback" not in err
    step = RunDir(run).load_state()["step"]
    assert step >= 3 and int(ckpt.weights_metadata(run / "model.safetensors")["step"]) == step
    r = cli("train", "--out", run, "--resume", "--max-steps", step + 2, "--no-progress")
    assert r.returncode == 0 and f"at step {step}" in r.stderr, r.stderr


def test_one_writer_per_run_and_no_stale_lock_after_a_crash(prepared, tmp_path, tok):
    run = tmp_path / "run"
    p = _start(
        ["train", "--data", prepared, "--out", run, "--max-steps", 100000, "--eval-every", 2, "--log-every", 1, *TINY]
    )
    try:
        wait_for_step(run, 2, p)
        time.sleep(0.5)
        r = cli("train", "--out", run, "--resume", "--no-progress")
        assert (
            r.returncode == 2 and "being written by another gradlm process" in r.stderr and f"pid {p.pid}" in r.stderr
        ), r.stderr
    finally:
        p.kill()  # SIGKILL: the kernel drops its lock
        p.wait()
    step = RunDir(run).load_state()["step"]  # however far it got before the kill (a fast machine gets far)
    r = cli("train", "--out", run, "--resume", "--max-steps", step + 4, "--no-progress")
    assert r.returncode == 0, r.stderr


def test_a_full_disk_keeps_the_previous_checkpoint_intact(prepared, tmp_path, tok, monkeypatch):
    real = ckpt.write_weights
    calls = []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint finds the disk full half-way through
            real(path, *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, *a, **kw)

    monkeypatch.setattr(ckpt, "write_weights", failing)
    with pytest.raises(RunDirError, match="the disk is full; the previous checkpoint is intact"):
        train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=8, eval_every=2))
    run = tmp_path / "run"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written left behind
    assert RunDir(run).load_state()["step"] == 2
    load_model(run)  # still loadable
    monkeypatch.setattr(ckpt, "write_weights", real)
    s = train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=8, eval_every=2, resume=True))
    assert s["steps"] == 8


def test_corrupt_files_give_one_line_naming_the_file(prepared, tmp_path, tok):
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, max_steps=4, pause_at=2))
    run = tmp_path / "run"
    state = run / "state" / "trainer.pt"
    state.write_bytes(state.read_bytes()[:100])
    r = cli("train", "--out", run, "--resume", "--no-progress")
    assert r.returncode == 2 and "trainer.pt" in r.stderr and "corrupt" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    for args in (
        ("generate", run, "hi"),
        ("eval", run, "--data", prepared / "tokenizer.json"),
        ("train", "--out", run, "--resume"),
    ):
        r = cli(*args)
        assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    (run / "config.json").write_text('{"model": {}, "gradlm_version": "9.0.0"}')
    r = cli("generate", run, "hi")
    assert r.returncode == 2 and "gradlm 9.0.0" in r.stderr, r.stderr


def test_kill_9_at_random_moments_then_resume_is_bit_identical(prepared, tmp_path):
    """SIGKILL at seeded random moments (mid-step, mid-checkpoint, whatever comes), resume each time;
    the final weights and training state equal an uninterrupted run's, byte for byte."""
    args = [
        "--data",
        prepared,
        "--max-steps",
        60,
        "--eval-every",
        3,
        "--log-every",
        1,
        "--seed",
        0,
        "--dropout",
        0.1,
        *TINY,
    ]
    straight = cli("train", "--out", tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    p, kills = kill_and_resume(
        run,
        _start(["train", "--out", run, *args]),
        (1, 15, 30, 45),
        ["train", "--out", run, "--resume", "--no-progress"],
        random.Random(1),
        pause=0.4,
        last=60,
    )
    if p is not None:
        p.communicate(timeout=300)
        assert p.returncode == 0
    assert kills >= 2
    print(
        f"kill -9 test: {kills} kills at seeded random moments, {len(read_metrics(run))} metrics rows; final weights "
        "byte-identical"
    )
    assert (run / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 61))  # every step logged once: no duplicates, no gaps


def test_a_run_killed_before_its_first_checkpoint_starts_again_from_its_init(prepared, tmp_path, tok):
    train(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, name="a", max_steps=4))
    t = Trainer(
        tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, name="b", init=str(tmp_path / "a"), max_steps=4)
    ).build()
    t.start_run_dir()  # config.json is written, then the process dies before any checkpoint
    t.close_run_dir()
    r = Trainer(tiny_config(tok.vocab_size), cfg_for(prepared, tmp_path, name="b", resume=True)).build()
    assert r.step == 0 and any("no checkpoint yet" in n for n in r.notes)
    a, _ = load_model(tmp_path / "a")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in r.model.state_dict().items())


def test_a_run_written_whole_loads_and_a_failed_one_leaves_nothing(tmp_path, tok, monkeypatch):
    """RunDir.create (merge, import): config.json last, in a folder renamed into place; a failure midway
    leaves neither a run nor a temporary folder."""
    from gradlm.model.transformer import Transformer
    from gradlm.rundir import config_dict

    model = Transformer(tiny_config(tok.vocab_size))
    config = config_dict(model.cfg, {}, {"tokenizer": "given"})
    run = RunDir.create(tmp_path / "whole", config, tok, model.state_dict(), step=7, chat_template=True)
    loaded, loaded_tok = run.load_model()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded_tok.sha256 == tok.sha256 and run.has_chat_template() and run.load_weights_into(loaded) == 7

    def broken(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_weights", broken)
    with pytest.raises(OSError):
        RunDir.create(tmp_path / "half", config, tok, model.state_dict(), step=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]
