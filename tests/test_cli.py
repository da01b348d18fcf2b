"""The command line end to end, and one clear line + exit code 2 for every user mistake."""

import gzip
import subprocess
import sys

import pytest

from gradlm.cli import main

TINY = ["--block-size", "32", "--n-layer", "2", "--n-head", "4", "--d-model", "32", "--batch", "8", "--eval-tokens", "1024", "--no-progress"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_end_to_end_train_generate_resume(tmp_path, text_file):
    out = tmp_path / "run"
    r = run("train", "--data", text_file, "--out", out, "--vocab-size", 300, "--max-steps", 6, "--eval-every", 3, *TINY)
    assert r.returncode == 0, r.stderr
    assert "val bits per byte" in r.stdout
    g = run("generate", out, "ROMEO:", "--max-new-tokens", 20, "--seed", 1)
    assert g.returncode == 0 and len(g.stdout.strip()) > 0
    assert g.stdout == run("generate", out, "ROMEO:", "--max-new-tokens", 20, "--seed", 1).stdout  # same seed, same text
    r = run("train", "--out", out, "--max-steps", 9, "--resume", "--no-progress")  # everything else from the run
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and "at step 6" in r.stderr and " 9 steps" in r.stdout


def test_tokenizer_train_and_tokenize(tmp_path, text_file, capsys):
    assert main(["tokenizer", "train", "--data", str(text_file), "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]) == 0
    assert main(["tokenize", "ibuprofen 🙂", "--tokenizer", str(tmp_path / "tok.json")]) == 0
    out = capsys.readouterr().out
    assert "tokens for" in out and "b'\\xf0" in out


def test_prepare_then_train_on_prepared(tmp_path, text_file):
    assert main(["prepare", "--data", str(text_file), "--out", str(tmp_path / "prep"), "--vocab-size", "300", "--workers", "1"]) == 0
    assert main(["train", "--data", str(tmp_path / "prep"), "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-plots", *TINY]) == 0


def _bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with gzip.open(tmp_path / "bad.txt.gz", "wb") as f:
        f.write(b"\xff\xfe\x00")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "missing.txt"], "no such file"),
        (["train", "--data", "empty.txt"], "empty"),
        (["train", "--data", "binary.txt"], "binary"),
        (["train", "--data", "latin1.txt"], "not valid UTF-8"),
        (["train", "--data", "bad.txt.gz"], "binary"),
        (["train", "--data", "ok.txt", "--vocab-size", "100"], "too small"),
        (["train", "--data", "ok.txt", "--vocab-size", "60000"], "larger than this corpus"),
        (["train", "--data", "ok.txt", "--optimizer", "adam"], "--optimizer"),
        (["train", "--data", "ok.txt", "--batch", "0"], "--batch"),
        (["train", "--data", "ok.txt", "--max-time", "soon"], "--max-time"),
        (["train", "--data", "ok.txt", "--lr", "fast"], "invalid float"),
        (["train", "--data", "ok.txt", "--d-model", "30"], "divisible"),
        (["train", "--data", "ok.txt", "--block-size", "100000"], "context window"),
        (["train", "--data", "ok.txt", "--resume"], "not a run directory"),
        (["generate", "not-a-run", "hi"], "no run directory"),
        (["generate", "ok.txt", "hi"], "no run directory"),
        (["generate", "emptyrun", "hi"], "not a run directory"),
        (["tokenize", "hi"], "--tokenizer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, small_text, args, message):
    _bad_files(tmp_path)
    (tmp_path / "ok.txt").write_text(small_text[:20000])
    (tmp_path / "emptyrun").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run(*args, "--out", "newrun", cwd=tmp_path) if args[0] == "train" else run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and message in errors[0], r.stderr  # progress lines may precede it
    assert "Traceback" not in r.stderr
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")  # the token cache is not output
    assert after == before  # nothing half-written
