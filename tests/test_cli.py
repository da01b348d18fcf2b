"""The command line end to end, and one clear line + exit code 2 for every user mistake."""

import subprocess
import sys

import pytest


from gradlm.cli import main

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
]


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_end_to_end_train_generate_resume(tmp_path, text_file):
    out = tmp_path / "run"
    r = run("train", "--data", text_file, "--out", out, "--vocab-size", 300, "--max-steps", 6, "--eval-every", 3, *TINY)
    assert r.returncode == 0, r.stderr
    assert "val bits per byte" in r.stdout
    g = run("generate", out, "ROMEO:", "--max-new-tokens", 20, "--seed", 1)
    assert g.returncode == 0 and len(g.stdout.strip()) > 0
    # same seed, same text
    assert g.stdout == run("generate", out, "ROMEO:", "--max-new-tokens", 20, "--seed", 1).stdout
    r = run("train", "--out", out, "--max-steps", 9, "--resume", "--no-progress")  # everything else from the run
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and "at step 6" in r.stderr and " 9 steps" in r.stdout


def test_tokenizer_train_and_tokenize(tmp_path, text_file, capsys):
    assert (
        main(
            ["tokenizer", "train", "--data", str(text_file), "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]
        )
        == 0
    )
    assert main(["tokenize", "ibuprofen 🙂", "--tokenizer", str(tmp_path / "tok.json")]) == 0
    out = capsys.readouterr().out
    assert "tokens for" in out and "b'\\xf0" in out


def test_each_command_parses_alone_and_the_text_commands_never_load_torch(tmp_path, text_file, capsys):
    """`gradlm X` builds X's parser only, with the same flags as the whole parser's; `gradlm --help` lists every
    command without building their flags; and neither the list nor the tokenizer's commands and prepare load
    torch (each started ~1.3 s later when every command's flags were built)."""
    from gradlm.cli import COMMANDS, build_parser

    whole = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert list(whole) == list(COMMANDS)
    for name in COMMANDS:
        alone = next(a for a in build_parser(name)._actions if a.__class__.__name__ == "_SubParsersAction").choices
        assert list(alone) == [name] and alone[name].format_help() == whole[name].format_help()
    # a flag before the command: the whole parser's message, as before (the command's required flags first)
    with pytest.raises(SystemExit) as exit:
        main(["--foo", "prepare"])
    assert exit.value.code == 2 and "required: --data, --out" in capsys.readouterr().err
    tok, prep = tmp_path / "tok.json", tmp_path / "prep"
    code = f"""
import sys
from gradlm.cli import build_parser, main
listed = build_parser("--help").format_help()
assert all(name in listed for name in {list(COMMANDS)!r}), listed
assert main(["tokenizer", "train", "--data", {str(text_file)!r}, "--vocab-size", "300", "--out", {str(tok)!r}]) == 0
assert main(["tokenize", "ibuprofen", "--tokenizer", {str(tok)!r}]) == 0
assert main(["prepare", "--data", {str(text_file)!r}, "--tokenizer", {str(tok)!r}, "--out", {str(prep)!r}]) == 0
sys.exit("torch was imported" if "torch" in sys.modules else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (prep / "meta.json").exists()


def test_prepare_then_train_on_prepared(tmp_path, text_file):
    assert (
        main(
            [
                "prepare",
                "--data",
                str(text_file),
                "--out",
                str(tmp_path / "prep"),
                "--vocab-size",
                "300",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "prep"),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--no-plots",
                *TINY,
            ]
        )
        == 0
    )


def test_train_watch_serves_the_run_while_it_trains_and_stops_with_it(tmp_path, text_file):
    """--watch starts `gradlm watch` beside the training, prints its address before the first step, the page
    streams the run while it trains, and the watcher ends with the command (no process left behind)."""
    import httpx

    out = tmp_path / "run"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradlm",
            "train",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--max-steps",
            "600",
            "--eval-every",
            "25",
            "--watch",
            "--watch-port",
            "0",
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stderr.readline()
        while line and "watch it live:" not in line:
            line = p.stderr.readline()
        url = line.split("watch it live: ")[1].split()[0]
        assert httpx.get(url, timeout=10).status_code == 200
        seen = ""
        with httpx.stream("GET", url + "events", timeout=httpx.Timeout(10.0, read=60.0)) as r:
            for chunk in r.iter_text():
                seen += chunk
                if '"val_loss"' in seen:  # an evaluation row of the running training reached the page
                    break
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, err
    try:
        httpx.get(url, timeout=2)
        raise AssertionError("the watcher outlived the training")
    except httpx.ConnectError:
        pass


def test_watch_port_in_use_is_one_line_before_training(tmp_path, text_file):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = run(
            "train",
            "--data",
            text_file,
            "--out",
            tmp_path / "run",
            "--max-steps",
            2,
            "--watch",
            "--watch-port",
            s.getsockname()[1],
            *TINY,
        )
    assert r.returncode == 2 and "--watch" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
