import json
import math

import pytest

from gradlm.training.compare import compare, parse_grid
from gradlm.training.lrfind import lr_find
from gradlm.training.config import TrainConfig

from conftest import tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def base(prepared, tmp_path, **kw):
    cfg = dict(
        data=str(prepared),
        out=str(tmp_path / "x"),
        batch="8",
        eval_tokens=1024,
        warmup_steps=0,
        seed=0,
        progress=False,
        plots=False,
    )
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_lr_find_returns_a_finite_suggestion_and_a_png(prepared, tmp_path, tok):
    r = lr_find(
        tiny_config(tok.vocab_size), base(prepared, tmp_path), 1e-5, 10.0, 40, tmp_path / "lr.png", log=lambda m: None
    )
    assert math.isfinite(r["suggested_lr"]) and 1e-5 <= r["suggested_lr"] <= r["min_loss_lr"] <= 10
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "x").exists()  # a range test leaves no run behind
    assert "falls fastest" in r["reason"]


def test_parse_grid_is_a_typed_product():
    grid = parse_grid({"optimizer": "sgd,adamw", "lr": "0.1,1e-3", "batch": "full,8"})
    assert len(grid) == 8 and grid[0] == {"optimizer": "sgd", "lr": 0.1, "batch": "full"}


def test_compare_runs_every_configuration_from_the_same_start(prepared, tmp_path, tok, monkeypatch):
    from gradlm import plots

    drawn = {}
    draw = plots.plot_compare
    monkeypatch.setattr(
        plots, "plot_compare", lambda curves, png, title="": drawn.update(curves) or draw(curves, png, title)
    )
    grid = parse_grid({"optimizer": "sgd,adamw"})
    r = compare(
        tiny_config(tok.vocab_size),
        base(prepared, tmp_path, max_steps=6, eval_every=3),
        grid,
        tmp_path / "cmp",
        log=lambda m: None,
    )
    assert [row["label"] for row in r["runs"]] == ["optimizer=sgd", "optimizer=adamw"]
    assert all(row["status"] == "ok" and row["steps"] == 6 for row in r["runs"])
    for f in ("compare.png", "compare.md", "compare.json"):
        assert (tmp_path / "cmp" / f).is_file()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["budget"] == "budget: max steps 6"
    # Same seed, same initial weights: both runs start from the same loss.
    firsts = [
        json.loads((tmp_path / "cmp" / d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        for d in ("optimizer-sgd", "optimizer-adamw")
    ]
    assert abs(firsts[0] - firsts[1]) < 1e-6
    # every run's curve is drawn
    assert sorted(drawn) == ["optimizer=adamw", "optimizer=sgd"] and all(len(c) for c in drawn.values())


def test_compare_reports_a_bad_setting_as_an_error_before_any_run(prepared, tmp_path, tok):
    import pytest

    from gradlm.errors import ConfigError

    grid = parse_grid({"lr": "0.001,-1"})
    with pytest.raises(ConfigError, match="lr=-1.0: .*--lr must be a positive number"):
        compare(
            tiny_config(tok.vocab_size),
            base(prepared, tmp_path, max_steps=4),
            grid,
            tmp_path / "cmp",
            log=lambda m: None,
        )
    assert not (tmp_path / "cmp").exists()  # refused before anything trained


def test_compare_tells_errors_from_divergence_and_exits_2_when_nothing_ran(prepared, tmp_path, tok):
    import pytest

    from gradlm.errors import ConfigError

    # An absurd learning rate diverges (a fact about gradient descent); a context window larger than the
    # data cannot start (a setting error): the table keeps them apart.
    grid = parse_grid({"optimizer": "sgd", "lr": "1e4,0.1"})
    r = compare(
        tiny_config(tok.vocab_size),
        base(prepared, tmp_path, max_steps=4, grad_clip=0.0, guard_retries=0),
        grid,
        tmp_path / "a",
        log=lambda m: None,
    )
    assert [row["status"] for row in r["runs"]] == ["diverged", "ok"]
    with pytest.raises(ConfigError, match="no run could start: .*context window"):
        compare(
            tiny_config(tok.vocab_size, block_size=10**6),
            base(prepared, tmp_path, max_steps=4),
            parse_grid({"optimizer": "sgd,adamw"}),
            tmp_path / "b",
            log=lambda m: None,
        )


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


TINY = [
    "--block-size",
    "32",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--d-model",
    "32",
    "--vocab-size",
    "300",
    "--eval-tokens",
    "1024",
    "--no-plots",
]


def test_compare_warns_when_a_run_cannot_be_ranked(text_file, tmp_path):
    """Runs that end inside their warmup, or after a handful of steps, are marked in the table and the log."""
    r = _cli(
        "compare",
        "--data",
        text_file,
        "--optimizer",
        "sgd,adamw",
        "--batch",
        "8",
        "--max-steps",
        6,
        "--warmup-steps",
        10,
        "--out",
        tmp_path / "cmp",
        *TINY,
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.count("ended inside its warmup (6 of 10 warmup steps)") == 2
        and "warning: 2 of 2 runs cannot be ranked" in r.stdout
    )
    assert "warning: optimizer=sgd: ended inside its warmup" in r.stderr
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert all("warmup" in row["warning"] for row in saved["runs"])
    r = _cli(
        "compare",
        "--data",
        text_file,
        "--optimizer",
        "adamw",
        "--batch",
        "8",
        "--max-steps",
        12,
        "--warmup-steps",
        2,
        "--out",
        tmp_path / "cmp2",
        *TINY,
    )
    assert r.returncode == 0 and "only 12 steps: too few to rank" in r.stdout


def test_compare_takes_the_flag_names_the_readme_uses_and_no_prefixes(text_file, tmp_path):
    r = _cli("compare", "--data", text_file, "--optimizers", "sgd", "--max-steps", 2, "--out", tmp_path / "cmp", *TINY)
    assert r.returncode == 2 and "unrecognized arguments: --optimizers" in r.stderr
    r = _cli("compare", "--data", text_file, "--optim", "sgd", "--max-steps", 2, "--out", tmp_path / "cmp", *TINY)
    assert r.returncode == 2 and "--optim" in r.stderr
    assert not (tmp_path / "cmp").exists()


def test_lr_find_shows_progress_and_writes_only_where_told(text_file, tmp_path):
    shape = TINY[:-3]  # lr-find has no evaluations and no plots of a run
    r = _cli("lr-find", "--data", text_file, "--steps", 20, "--batch", "8", *shape, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # plain progress lines off a terminal
    assert "lr-find: step 10/20" in r.stderr and "lr-find: step 20/20" in r.stderr
    assert "plot: none (add --png FILE" in r.stdout and not list(tmp_path.glob("*.png"))
    r = _cli("lr-find", "--data", text_file, "--steps", 20, "--batch", "8", "--png", "lr.png", *shape, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_find_records_the_sweep_in_out_as_it_runs_and_nothing_when_it_fails(prepared, tmp_path, tok):
    import pytest

    from gradlm.errors import ConfigError, GradlmError

    out = tmp_path / "sweep"
    r = lr_find(tiny_config(tok.vocab_size), base(prepared, tmp_path), 1e-5, 10.0, 30, log=lambda m: None, out=out)
    rows = [json.loads(ln) for ln in (out / "lr_find.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, len(r["lrs"]) + 1))
    assert [x["lr"] for x in rows] == r["lrs"] and [x["loss"] for x in rows] == r["losses"]
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggested_lr"] == r["suggested_lr"]
    with pytest.raises(ConfigError, match="already holds a learning-rate sweep"):
        lr_find(tiny_config(tok.vocab_size), base(prepared, tmp_path), 1e-5, 10.0, 30, log=lambda m: None, out=out)
    failing = tmp_path / "failing"
    with pytest.raises(GradlmError, match="lower --start-lr"):  # diverges at once: no half-written record is left
        lr_find(
            tiny_config(tok.vocab_size),
            base(prepared, tmp_path, optimizer="sgd", grad_clip=0.0),
            1e6,
            1e9,
            30,
            log=lambda m: None,
            out=failing,
        )
    assert not failing.exists()


def test_lr_find_watch_shows_the_sweep_and_keeps_nothing_without_out(text_file, tmp_path):
    shape = TINY[:-3]
    r = _cli(
        "lr-find",
        "--data",
        text_file,
        "--steps",
        12,
        "--batch",
        "8",
        "--watch",
        "--watch-port",
        0,
        *shape,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "watch it live: http://127.0.0.1:" in r.stderr and "add --out DIR to keep the sweep" in r.stderr
    assert "suggested lr" in r.stdout and "plot: none" in r.stdout
    # the sweep's folder was a temporary one (cache: the tests' own)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
