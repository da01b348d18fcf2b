"""The loss surface (gradlm/evaluation/landscape.py): filter-normalised directions, slices that recover a known
quadratic's curvature, the centre equal to the run's own validation loss, the initial weights rebuilt exactly,
the plane through the initial weights, and the command's files and mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradlm.cli import main
from gradlm.evaluation.landscape import (
    LandscapeConfig,
    curvature,
    filter_normalized,
    initial_weights,
    landscape,
    slice_1d,
    slice_2d,
    weights_of,
)
from gradlm.rundir import RunDir
from gradlm.training.config import TrainConfig
from gradlm.training.trainer import Trainer, train

from conftest import tiny_config


class Quadratic(torch.nn.Module):
    """L(w) = 1/2 (w - w*)^T H (w - w*) over one 4 x 3 matrix w (flattened), minimum at w*."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.star = self.w.detach().clone()
        m = torch.randn(12, 12, generator=g)
        self.h = m @ m.T + torch.eye(12)  # symmetric positive definite

    def loss(self) -> float:
        e = (self.w - self.star).reshape(-1).double()
        return float(0.5 * e @ self.h.double() @ e)


def test_directions_are_normalised_filter_by_filter():
    weights = {"m": torch.randn(5, 7) * torch.arange(1, 6).view(-1, 1), "gain": torch.ones(7)}
    d = filter_normalized(weights, torch.Generator().manual_seed(3))
    assert torch.allclose(d["m"].norm(dim=1), weights["m"].norm(dim=1), rtol=1e-5)  # each row: its filter's norm
    assert not d["gain"].any()  # the norms' gains stay where they are
    again = filter_normalized(weights, torch.Generator().manual_seed(3))
    assert torch.equal(d["m"], again["m"])  # seeded


def test_slices_through_a_known_quadratic_recover_its_curvature():
    q = Quadratic()
    base = weights_of(q)
    gen = torch.Generator().manual_seed(0)
    d1, d2 = filter_normalized(base, gen), filter_normalized(base, gen)
    v1, v2, h = d1["w"].reshape(-1).double(), d2["w"].reshape(-1).double(), q.h.double()
    axis = np.linspace(-1, 1, 11)
    one = slice_1d(q, base, d1, axis, q.loss)
    assert one[5] == pytest.approx(0.0, abs=1e-9)  # the centre is the minimum
    assert curvature(axis, one) == pytest.approx(float(v1 @ h @ v1), rel=1e-6)  # d1^T H d1
    two = slice_2d(q, base, d1, d2, axis, axis, q.loss)
    a, b = axis[8], axis[2]  # rows run along d2: two[j, i] is (axis[i], axis[j])
    expected = 0.5 * (a * a * (v1 @ h @ v1) + 2 * a * b * (v1 @ h @ v2) + b * b * (v2 @ h @ v2))
    assert two[2, 8] == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_file):
    """A tiny run trained in float32 whose validation loss the surface's centre must equal."""
    out = tmp_path_factory.mktemp("land") / "run"
    cfg = TrainConfig(
        data=str(text_file), out=str(out), vocab_size=300, max_steps=12, batch="8", eval_every=100, eval_tokens=2048,
        lr=3e-3, seed=4, dtype="float32", progress=False, plots=False,
    )  # fmt: skip
    summary = train(tiny_config(300), cfg)
    return out, summary


def test_the_centre_is_the_runs_validation_loss_and_the_line_ends_there(run, tmp_path):
    out, summary = run
    cfg = LandscapeConfig(grid=5, span=1.0, plane="init", line_points=7, batch_size=4)
    r = landscape(out, cfg, out=tmp_path / "land", progress=False)
    assert r["dtype"] == "float32"  # --dtype auto: what the run validated in
    assert r["center_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert r["slice_1d"][2] == pytest.approx(r["center_loss"], rel=1e-9)  # a = 0
    assert r["slice_2d"][2][2] == pytest.approx(r["center_loss"], rel=1e-9)
    ts = r["line_t"]
    assert ts[1] == 0.0 and ts[5] == 1.0
    assert r["line"][5] == pytest.approx(r["center_loss"], rel=1e-9)  # t = 1: the trained weights
    # --plane init: a = 1 along d1 is the initial weights, the line's t = 0
    assert r["slice_1d"][4] == pytest.approx(r["line"][1], rel=1e-6)
    assert r["line"][1] > r["center_loss"]  # training lowered the loss from where it started
    saved = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert saved["center_loss"] == r["center_loss"]
    assert {p.name for p in (tmp_path / "land").glob("*.png")} == {
        "landscape_1d.png", "landscape_2d.png", "landscape_3d.png", "landscape_line.png"
    }  # fmt: skip
    model, _ = RunDir(out).load_model()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), RunDir(out).load_model()[0].parameters()))


def test_initial_weights_are_rebuilt_as_training_made_them(tmp_path, text_file):
    cfg = TrainConfig(
        data=str(text_file), out=str(tmp_path / "r"), vocab_size=300, max_steps=3, seed=11, progress=False
    )
    t = Trainer(tiny_config(300), cfg).build()
    before = {k: v.clone() for k, v in t.model.named_parameters()}
    t.start_run_dir()
    t.close_run_dir()
    rebuilt = initial_weights(RunDir(tmp_path / "r"))
    assert before.keys() == rebuilt.keys() and all(torch.equal(before[k], rebuilt[k]) for k in before)


def test_the_command_writes_its_pictures_and_refuses_mistakes(run, tmp_path, capsys):
    out, _ = run
    where = tmp_path / "cli"
    args = ["landscape", str(out), "--grid", "3", "--line-points", "0", "--batches", "1", "--out", str(where)]
    assert main(args) == 0
    assert "loss at the centre" in capsys.readouterr().out
    assert (where / "landscape_2d.png").is_file() and not (where / "landscape_line.png").exists()
    for bad, words in (
        (["--grid", "2"], "--grid must be at least 3"),
        (["--plane", "pca"], "--plane must be one of random, init"),
        (["--span", "0"], "--span must be a positive number"),
        (["--dtype", "int8"], "--dtype must be auto, float32, bfloat16"),
    ):
        assert main(["landscape", str(out), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()
    assert main(["landscape", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
