"""What the course's scripts share: their two flags and where the pictures go."""

from __future__ import annotations

import argparse
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "img" / "course"


def args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds, for the tests")
    p.add_argument("--out", default=str(FIGURES), help="folder for the pictures (default: docs/img/course)")
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    return a


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def small_run(tiny: bool, model, max_steps: int, vocab_size: int = 1024, eval_tokens: int = 1024, **settings) -> tuple:
    """Train model (a ModelConfig) on Shakespeare (its first 100 KB and a 512-token vocabulary when tiny, 20 steps)
    in a temporary folder: (the run's folder, the training summary). settings: more TrainConfig fields (lr=...; seed 0
    unless given)."""
    import tempfile

    from gradlm import TrainConfig, train
    from gradlm.text.datasets import resolve

    work = Path(tempfile.mkdtemp(prefix="gradlm-course-"))
    data = work / "shakespeare.txt"
    data.write_text(resolve("shakespeare").read_text(encoding="utf-8")[: 100_000 if tiny else None], encoding="utf-8")
    cfg = TrainConfig(data=str(data), out=str(work / "run"), vocab_size=512 if tiny else vocab_size,
                      max_steps=20 if tiny else max_steps, eval_tokens=eval_tokens, progress=False, plots=False,
                      **{"seed": 0, **settings})  # fmt: skip
    return work / "run", train(model, cfg)
