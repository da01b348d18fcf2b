"""The command line end to end, and one clear line + exit code 2 for every user mistake."""

import subprocess
import sys


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
