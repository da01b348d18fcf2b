import json
import math

from gradlm.lab import compare, lr_find, parse_grid
from gradlm.config import TrainConfig

from conftest import tiny_config


def base(prepared, tmp_path, **kw):
    cfg = dict(data=str(prepared), out=str(tmp_path / "x"), batch="8", eval_tokens=1024, warmup_steps=0, seed=0, progress=False, plots=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_lr_find_returns_a_finite_suggestion_and_a_png(prepared, tmp_path, tok):
    r = lr_find(tiny_config(tok.vocab_size), base(prepared, tmp_path), 1e-5, 10.0, 40, tmp_path / "lr.png", log=lambda m: None)
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
    monkeypatch.setattr(plots, "plot_compare", lambda curves, png, title="": drawn.update(curves) or draw(curves, png, title))
    grid = parse_grid({"optimizer": "sgd,adamw"})
    r = compare(tiny_config(tok.vocab_size), base(prepared, tmp_path, max_steps=6, eval_every=3), grid, tmp_path / "cmp", log=lambda m: None)
    assert [row["label"] for row in r["runs"]] == ["optimizer=sgd", "optimizer=adamw"]
    assert all(row["status"] == "ok" and row["steps"] == 6 for row in r["runs"])
    for f in ("compare.png", "compare.md", "compare.json"):
        assert (tmp_path / "cmp" / f).is_file()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["budget"] == "budget: max steps 6"
    # Same seed, same initial weights: both runs start from the same loss.
    firsts = [json.loads((tmp_path / "cmp" / d / "metrics.jsonl").read_text().splitlines()[0])["loss"] for d in ("optimizer-sgd", "optimizer-adamw")]
    assert abs(firsts[0] - firsts[1]) < 1e-6
    assert sorted(drawn) == ["optimizer=adamw", "optimizer=sgd"] and all(len(c) for c in drawn.values())  # every run's curve is drawn


def test_compare_reports_a_bad_setting_as_an_error_before_any_run(prepared, tmp_path, tok):
    import pytest

    from gradlm.errors import ConfigError

    grid = parse_grid({"lr": "0.001,-1"})
    with pytest.raises(ConfigError, match="lr=-1.0: .*--lr must be a positive number"):
        compare(tiny_config(tok.vocab_size), base(prepared, tmp_path, max_steps=4), grid, tmp_path / "cmp", log=lambda m: None)
    assert not (tmp_path / "cmp").exists()  # refused before anything trained


def test_compare_tells_errors_from_divergence_and_exits_2_when_nothing_ran(prepared, tmp_path, tok):
    import pytest

    from gradlm.errors import ConfigError

    # An absurd learning rate diverges (a fact about gradient descent); a context window larger than the
    # data cannot start (a setting error): the table keeps them apart.
    grid = parse_grid({"optimizer": "sgd", "lr": "1e4,0.1"})
    r = compare(tiny_config(tok.vocab_size), base(prepared, tmp_path, max_steps=4, grad_clip=0.0, guard_retries=0), grid, tmp_path / "a", log=lambda m: None)
    assert [row["status"] for row in r["runs"]] == ["diverged", "ok"]
    with pytest.raises(ConfigError, match="no run could start: .*context window"):
        compare(tiny_config(tok.vocab_size, block_size=10**6), base(prepared, tmp_path, max_steps=4), parse_grid({"optimizer": "sgd,adamw"}), tmp_path / "b", log=lambda m: None)
