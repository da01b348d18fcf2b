"""Atomic writes under kill -9: every command that writes leaves its output whole, the previous one or the new one,
never half; what a kill leaves beside it (temporaries of a process that is gone) is removed by the next writer; a
fine-tune killed at random moments and resumed ends byte-identical to one that ran straight through."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradlm.files import atomic_write_dir, atomic_write_text, remove_stale
from gradlm.training.config import TrainConfig
from gradlm.training.trainer import train

from conftest import kill_and_resume, start_gradlm, tiny_config

TINY = ["--no-progress", "--no-plots"]


gradlm = start_gradlm


def finished(p: subprocess.Popen) -> None:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """What a path holds: its files' bytes by relative name (a file alone: ""), None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_writers_leftovers_go_and_a_live_ones_stay(tmp_path):
    target = tmp_path / "out"
    atomic_write_dir(target, lambda t: (t / "a").write_text("old"))
    # a process that is gone, and one that is alive (not this one: skipped as itself)
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".out.{dead}.abc.tmp").mkdir()
    (tmp_path / f".out.{live}.abc.tmp").mkdir()
    (tmp_path / ".out.notapid.tmp").mkdir()
    (tmp_path / f".outer.{dead}.x.tmp").write_text("another file's")
    atomic_write_dir(target, lambda t: (t / "b").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.{live}.abc.tmp", ".out.notapid.tmp", f".outer.{dead}.x.tmp", "out"]
    )
    assert snapshot(target) == {"b": b"new"}
    # Killed between moving the previous folder aside and the new one in (where no atomic swap exists):
    shutil.rmtree(target)
    aside = tmp_path / f".out.{dead}.q.old"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "a").write_text("previous")
    remove_stale(target)
    assert snapshot(target) == {"a": b"previous"} and not aside.exists()
    atomic_write_text(tmp_path / "f.txt", "1")
    (tmp_path / f".f.txt.{dead}.zz.tmp").write_text("half")
    atomic_write_text(tmp_path / "f.txt", "2")
    assert not (tmp_path / f".f.txt.{dead}.zz.tmp").exists() and (tmp_path / "f.txt").read_text() == "2"


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared, tok) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse cache fixture does not reach here
        mp.setenv("GRADLM_CACHE", str(out.parent / "cache"))
        train(
            tiny_config(tok.vocab_size, block_size=64, d_model=64),
            TrainConfig(
                data=str(prepared),
                out=str(out),
                batch="8",
                max_steps=4,
                eval_every=4,
                eval_tokens=1024,
                seed=0,
                progress=False,
                plots=False,
            ),
        )
    return out


def timed(argv: list) -> float:
    """Run gradlm argv to the end: how long it took."""
    t0 = time.time()
    finished(gradlm(*argv))
    return time.time() - t0


def kill_at_random_moments(argv: list, took: float, check, rng: random.Random, kills: int = 4) -> None:
    """Start gradlm argv `kills` times, each SIGKILLed at a seeded random moment over `took`, the time the same command
    took straight through (most of a short command is starting Python and torch: the moments lean late, where it
    writes), calling check() after each kill."""
    for _ in range(kills):
        p = gradlm(*argv)
        time.sleep(rng.uniform(0.5, 1.1) * took)
        p.kill()
        p.communicate()
        check()


@pytest.mark.parametrize(
    "fmt, old, new",
    [
        ("hf", ["--dtype", "float32"], ["--dtype", "bfloat16"]),
        ("gguf", ["--gguf-type", "f32"], ["--gguf-type", "q8_0"]),
    ],
)
def test_an_export_killed_anywhere_is_the_previous_export_or_the_new_one(base, tmp_path, fmt, old, new):
    pytest.importorskip("gguf") if fmt == "gguf" else None
    out = tmp_path / "out"
    took = timed(["export", base, tmp_path / "new", "--format", fmt, *new])
    finished(gradlm("export", base, out, "--format", fmt, *old))
    refs = {"old": snapshot(out), "new": snapshot(tmp_path / "new")}
    seen = []

    def check():
        got = snapshot(out)
        seen.append("old" if got == refs["old"] else "new" if got == refs["new"] else "HALF")
        assert seen[-1] != "HALF", sorted(got or {})
        if seen[-1] == "new":  # start the next try from the previous export's files again
            shutil.rmtree(out)
            for name, data in refs["old"].items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)

    kill_at_random_moments(["export", base, out, "--format", fmt, *new], took, check, random.Random(7))
    print(f"export {fmt}: after each kill the target held the {', '.join(seen)} export")
    finished(gradlm("export", base, out, "--format", fmt, *new))
    assert snapshot(out) == refs["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"], seen  # the kills' leftovers are gone


def test_tokenizer_train_killed_anywhere_leaves_the_previous_file_or_the_new_one(tmp_path, text_file):
    out = tmp_path / "tok.json"
    took = timed(["tokenizer", "train", "--data", text_file, "--vocab-size", 300, "--out", tmp_path / "new.json"])
    finished(gradlm("tokenizer", "train", "--data", text_file, "--vocab-size", 280, "--out", out))
    old, new = out.read_bytes(), (tmp_path / "new.json").read_bytes()

    def check():
        assert out.read_bytes() in (old, new)
        out.write_bytes(old)

    kill_at_random_moments(
        ["tokenizer", "train", "--data", text_file, "--vocab-size", 300, "--out", out], took, check, random.Random(3)
    )
    finished(gradlm("tokenizer", "train", "--data", text_file, "--vocab-size", 300, "--out", out))
    assert out.read_bytes() == new and sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "tok.json"]


def qa_file(path: Path) -> Path:
    rows = [{"prompt": f"dose of drug {c}?", "completion": f"{10 * (i + 1)} mg"} for i, c in enumerate("ABCDEFGH")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_merge_killed_anywhere_leaves_nothing_or_the_whole_run(base, tmp_path):
    pytest.importorskip("peft")
    lora = tmp_path / "lora"
    finished(
        gradlm(
            "finetune",
            base,
            "--data",
            qa_file(tmp_path / "qa.jsonl"),
            "--out",
            lora,
            "--method",
            "lora",
            "--max-steps",
            3,
            "--eval-every",
            3,
            "--val-fraction",
            "0.25",
            *TINY,
        )
    )
    took = timed(["merge", lora, "--out", tmp_path / "ref"])
    ref, out = snapshot(tmp_path / "ref"), tmp_path / "merged"

    def check():
        got = snapshot(out)
        assert got is None or got == ref, sorted(got or {})  # nothing, or the whole run
        shutil.rmtree(out, ignore_errors=True)

    kill_at_random_moments(["merge", lora, "--out", out], took, check, random.Random(5))
    finished(gradlm("merge", lora, "--out", out))
    assert snapshot(out) == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "merged", "qa.jsonl", "ref"]


def test_a_finetune_killed_at_random_moments_and_resumed_is_byte_identical(base, tmp_path):
    qa = qa_file(tmp_path / "qa.jsonl")
    args = [
        "--data",
        qa,
        "--max-steps",
        40,
        "--eval-every",
        4,
        "--log-every",
        1,
        "--batch",
        4,
        "--val-fraction",
        "0.25",
        "--seed",
        0,
        *TINY,
    ]
    finished(gradlm("finetune", base, "--out", tmp_path / "straight", *args))
    run = tmp_path / "killed"
    p, kills = kill_and_resume(
        run,
        gradlm("finetune", base, "--out", run, *args),
        (1, 12, 24, 33),
        ["finetune", "--out", run, "--resume", "--no-progress"],
        random.Random(11),
        pause=0.3,
        last=40,
    )
    if p is not None:
        finished(p)
    assert kills >= 2
    assert (run / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    steps = [
        r["step"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in r and "event" not in r
    ]
    assert steps == list(range(1, 41))  # every step logged once
