"""The loss surface (gradlm/evaluation/landscape.py): filter-normalised directions, slices that recover a known
quadratic's curvature, the centre equal to the run's own validation loss, the initial weights rebuilt exactly,
the plane through the initial weights, the path training recorded (--snapshots: written at evenly spaced steps,
kept exact by resume and the divergence guard) and its own plane, and the command's files and mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradlm import files
from gradlm.cli import main
from gradlm.errors import ConfigError
from gradlm.evaluation.landscape import (
    LandscapeConfig,
    curvature,
    filter_normalized,
    initial_weights,
    landscape,
    loss_fn,
    path_directions,
    project_path,
    run_windows,
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
        (["--plane", "path"], "recorded none (no snapshots/); train with --snapshots N"),
    ):
        assert main(["landscape", str(out), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()
    assert main(["landscape", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ---- the path training took: --snapshots, --plane path -------------------------------------------------------


def path_cfg(text_file, out, **kw) -> TrainConfig:
    base = dict(
        data=str(text_file), out=str(out), vocab_size=300, max_steps=12, batch="8", eval_every=4, eval_tokens=1024,
        lr=3e-3, seed=4, dtype="float32", progress=False, plots=False, sample_tokens=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def snapshot(out, step: int) -> dict[str, torch.Tensor]:
    return files.load_weights(RunDir(out).snapshot_path(step))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshots_are_taken_at_evenly_spaced_steps_and_resume_neither_repeats_nor_loses_them(text_file, tmp_path):
    with pytest.raises(ConfigError, match="--snapshots must not be negative, got -1"):
        TrainConfig(snapshots=-1).validate()
    whole = tmp_path / "whole"
    train(tiny_config(300), path_cfg(text_file, whole, snapshots=3))
    assert RunDir(whole).list_snapshots() == [3, 6, 9]  # 12 steps: the points 1/4, 2/4, 3/4; the end is the checkpoint
    assert json.loads(RunDir(whole).config.read_text())["train"]["snapshots"] == 3
    assert files.weights_metadata(RunDir(whole).snapshot_path(6)) == {"step": "6"}
    # the same run stopped at step 6: its weights there are the snapshot (the same tensors, in float32)
    parts = tmp_path / "parts"
    train(tiny_config(300), path_cfg(text_file, parts, snapshots=3, pause_at=6))
    assert same(snapshot(whole, 6), files.load_weights(RunDir(parts).weights))
    assert snapshot(whole, 6)["embed_tokens.weight"].dtype == torch.float32
    # ... paused again at 8 (a checkpoint at step 8), and killed later, after it took snapshots past that checkpoint
    train(tiny_config(300), path_cfg(text_file, parts, snapshots=3, pause_at=8, resume=True))
    zeros = {k: torch.zeros_like(v) for k, v in snapshot(whole, 9).items()}
    for step in (9, 10):
        RunDir(parts).save_snapshot(zeros, step)
    train(tiny_config(300), path_cfg(text_file, parts, snapshots=3, resume=True))
    assert RunDir(parts).list_snapshots() == [3, 6, 9]
    assert all(same(snapshot(whole, s), snapshot(parts, s)) for s in (3, 6, 9))  # step 9 taken again, exactly
    # a budget extended on resume goes on at the points of the new budget: 24 steps, after 12 the next is at 3/4
    train(tiny_config(300), path_cfg(text_file, parts, snapshots=3, max_steps=24, resume=True), given={"max_steps"})
    assert RunDir(parts).list_snapshots() == [3, 6, 9, 18]


def test_a_divergence_guard_restore_takes_back_the_snapshots_of_the_steps_it_undoes(text_file, tmp_path):
    t = Trainer(tiny_config(300), path_cfg(text_file, tmp_path / "r", snapshots=3)).build()
    t.start_run_dir()
    good = t.snapshot()
    t.step = 3  # 3 of 12 steps: the first point
    t.record_path()
    t.step = 4
    t.record_path()  # not a point
    assert RunDir(t.out).list_snapshots() == [3]
    t.restore(good)  # the guard goes back to step 0
    assert RunDir(t.out).list_snapshots() == [] and t.state.path_at == 0.0
    t.step = 3
    t.record_path()  # and on its way again takes the snapshot again
    assert RunDir(t.out).list_snapshots() == [3]
    t.close_run_dir()


def test_the_path_is_projected_by_least_squares_onto_directions_that_are_not_orthogonal():
    g = torch.Generator().manual_seed(0)
    d1, d2, off = ({"w": torch.randn(6, 4, generator=g, dtype=torch.float64)} for _ in range(3))
    d2 = {"w": d2["w"] + 0.5 * d1["w"]}  # far from orthogonal
    point = {"w": 0.3 * d1["w"] - 0.2 * d2["w"]}
    coords, off_plane, held = project_path([point, {"w": point["w"] + 0 * off["w"]}], d1, d2)
    assert coords[0] == pytest.approx([0.3, -0.2], abs=1e-12) and off_plane[0] == pytest.approx(0.0, abs=1e-6)
    assert held == pytest.approx(1.0)
    coords, off_plane, held = project_path([{"w": point["w"] + off["w"]}], d1, d2)
    assert off_plane[0] > 0.1 and held < 1


def test_the_paths_directions_are_its_top_two_singular_vectors_not_centred():
    g = torch.Generator().manual_seed(1)
    diffs = [{"m": torch.randn(5, 3, generator=g), "v": torch.randn(4, generator=g)} for _ in range(4)]
    d1, d2 = path_directions(diffs, g)

    def flat(d):
        return torch.cat([d["m"].reshape(-1), d["v"]]).double()

    u, v, m = flat(d1), flat(d2), torch.stack([flat(d) for d in diffs])
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6) and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(u @ v) == pytest.approx(0.0, abs=1e-6)  # unit and orthogonal: not filter-normalised
    _, s, vh = torch.linalg.svd(m, full_matrices=False)  # the reference: the points' matrix, not centred
    plane, reference = torch.stack([u, v]).T, vh[:2].T
    assert torch.allclose(plane @ plane.T, reference @ reference.T, atol=1e-5)  # the same plane
    assert float(m[0] @ u) > 0 and float(m[0] @ v) > 0  # signed toward the first point (the initial weights)
    _, _, held = project_path(diffs, d1, d2)
    assert held == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-5)


@pytest.fixture(scope="module")
def path_run(tmp_path_factory, text_file):
    """A tiny run that recorded one snapshot (step 4 of 8): with the initial and final weights, a path that its
    plane holds exactly."""
    out = tmp_path_factory.mktemp("land") / "path"
    train(tiny_config(300), path_cfg(text_file, out, max_steps=8, snapshots=1, eval_every=100, eval_tokens=2048))
    assert RunDir(out).list_snapshots() == [4]
    return out


def test_the_plane_of_the_path_holds_it_and_the_loss_there_is_the_snapshots(path_run, tmp_path, capsys):
    cfg = LandscapeConfig(grid=3, line_points=0, batch_size=4, plane="path")
    r = landscape(path_run, cfg, out=tmp_path / "land", progress=False)
    initial, step4, final = r["path"]
    assert [p["name"] for p in r["path"]] == ["initial", "step 4", "final"] and step4["step"] == 4
    assert (final["a"], final["b"]) == (0.0, 0.0) and final["plane_loss"] == r["center_loss"]  # theta*: the origin
    assert r["path_explained"] == pytest.approx(1.0, abs=1e-6)  # two points besides theta*: a plane holds them
    # the loss at the snapshot's point of the plane is the loss of its own weights, scored apart
    model, tok = RunDir(path_run).load_model()
    RunDir(path_run).load_snapshot_into(model, 4)
    direct = loss_fn(model, run_windows(RunDir(path_run), 4), torch.tensor(tok.token_byte_lengths()), "float32")()
    assert step4["loss"] == pytest.approx(direct, rel=1e-9)
    assert step4["plane_loss"] == pytest.approx(direct, rel=1e-5) and step4["off_plane"] < 1e-3
    assert initial["plane_loss"] == pytest.approx(initial["loss"], rel=1e-5) and initial["loss"] > direct
    assert initial["a"] > 0  # the directions point toward where training started
    # the grid spans every point of the path, with a margin; its centre is theta*
    a, b = np.abs([p["a"] for p in r["path"]]).max(), np.abs([p["b"] for p in r["path"]]).max()
    assert r["axis"][-1] == pytest.approx(1.25 * a) and r["axis_b"][-1] >= 1.25 * b
    assert r["slice_2d"][1][1] == pytest.approx(r["center_loss"], rel=1e-9)
    saved = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert saved["path_explained"] == r["path_explained"] and saved["path"][1]["plane_loss"] == step4["plane_loss"]
    # another plane draws the path too: with --plane init the initial weights are at (1, 0)
    args = ["landscape", str(path_run), "--plane", "init", "--grid", "3", "--line-points", "0", "--batches", "1"]
    assert main([*args, "--out", str(tmp_path / "init"), "--json"]) == 0
    init = json.loads(capsys.readouterr().out)["path"]
    assert init[0]["a"] == pytest.approx(1.0, abs=1e-6) and init[0]["b"] == pytest.approx(0.0, abs=1e-6)
