"""Chapter 9, local minima and the loss surface: train a small model on Shakespeare, then look at the surface around
what it found (gradlm landscape): a random plane through the trained weights, the plane through the initial ones,
and the straight line between them."""

import shutil
from pathlib import Path

from _common import args, small_run

from gradlm import ModelConfig
from gradlm.evaluation.landscape import LandscapeConfig, landscape

a = args(__doc__)
shape = (
    dict(n_layer=2, d_model=64, n_head=4, block_size=64)
    if a.tiny
    else dict(n_layer=4, d_model=128, n_head=4, block_size=128)
)
run, summary = small_run(
    a.tiny, ModelConfig(**shape), max_steps=400, vocab_size=512, eval_tokens=1024 if a.tiny else 4096
)
work = run.parent
grid = 5 if a.tiny else 15
for plane in ("random", "init"):
    r = landscape(work / "run", LandscapeConfig(grid=grid, span=1.0 if plane == "random" else 1.5, plane=plane,
                  line_points=7 if a.tiny else 25), out=work / plane, progress=False)  # fmt: skip
    shutil.copy(work / plane / "landscape_2d.png", Path(a.out) / f"09_surface_{plane}.png")
    if plane == "random":
        shutil.copy(work / plane / "landscape_line.png", Path(a.out) / "09_line.png")
        print(f"check: validation loss {summary['val_loss']:.4f}; the surface's centre {r['center_loss']:.4f}")
        print(f"check: curvature along the random direction: {r['curvature_d1']:.3g}")
        line = dict(zip(r["line_t"], r["line"]))
        print(f"check: on the line: initial weights {line[0.0]:.4f}, halfway {line[0.5]:.4f}, trained {line[1.0]:.4f}")
shutil.rmtree(work)
