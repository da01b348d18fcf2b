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
