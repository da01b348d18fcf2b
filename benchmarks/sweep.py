"""Does `gradlm sweep` find better settings than `--size auto` under the same budget per run?

Side by side, on one machine, in one run: `gradlm train --max-time 30s` with no flags (--size auto chooses
everything), then `gradlm sweep` with --trials 16 of the same 30 s each over a space that --size auto fills in
around (it keeps choosing what the search does not set), then the baseline again (two baselines: how much two
runs of the same command differ on a shared machine). Prints the comparison, the best trial's settings and what
the importance plot says mattered, with the CPU. Everything is written under --out (default: a temporary folder).

    python benchmarks/sweep.py                    # the figures in docs/benchmarks.md (~12 minutes on 2 cores)
    python benchmarks/sweep.py --trials 4 --trial-time 10s     # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import cpu_model  # noqa: E402  (benchmarks/serve.py)

# How it learns; --size auto keeps choosing the shape for the budget. (With the shape searched too, n-layer=2..6
# d-model=96..256:32, 16 trials did not find a model as good as the one --size auto picks: docs/benchmarks.md.)
SPACE = ["lr=1e-3..1e-2:log", "batch=4,8,16", "optimizer=adamw,muon", "dropout=0..0.2"]
WIDE = [
    "lr=1e-3..2e-2:log",
    "batch=4,8,16,32",
    "optimizer=adamw,muon",
    "dropout=0..0.3",
    "n-layer=2..6",
    "d-model=96..256:32",
]


def gradlm(*args: str) -> float:
    """Run a gradlm command (its progress to our stderr); the wall time it took."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "gradlm", *args], check=True, stdout=sys.stderr)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--trial-time", default="30s", help="the budget of the baseline and of every trial")
    ap.add_argument(
        "--search",
        nargs="+",
        default=SPACE,
        help="the search space (default: the learning settings; --wide adds the shape)",
    )
    ap.add_argument("--wide", action="store_true", help=f"search {' '.join(WIDE)}")
    ap.add_argument("--objective", default="val_bpb", choices=("val_bpb", "val_loss"), help="what the sweep minimises")
    ap.add_argument("--out", default="", help="folder for the runs and the sweep (default: a temporary one)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="gradlm-sweep-bench-"))
    space = WIDE if a.wide else a.search
    base = ["--data", a.data, "--max-time", a.trial_time, "--no-progress"]
    t_base1 = gradlm("train", *base, "--out", str(out / "baseline-1"))
    t_sweep = gradlm(
        "sweep",
        *base,
        "--out",
        str(out / "sweep"),
        "--trials",
        str(a.trials),
        "--size",
        "auto",
        "--objective",
        a.objective,
        "--search",
        *space,
    )
    t_base2 = gradlm("train", *base, "--out", str(out / "baseline-2"))
    baselines = [json.loads((out / b / "summary.json").read_text()) for b in ("baseline-1", "baseline-2")]
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    best = sweep["best"]
    best_run = json.loads((Path(best["run"]) / "summary.json").read_text())
    states = {}
    for r in sweep["trials"]:
        states[r["state"]] = states.get(r["state"], 0) + 1
    print(f"machine: {cpu_model()}, 2 threads; data {a.data}; every run {a.trial_time}")
    print("| run | val loss | val bits/byte | steps | wall (s) |\n|---|---:|---:|---:|---:|")
    for name, s, t in (
        ("train (size auto), before", baselines[0], t_base1),
        ("train (size auto), after", baselines[1], t_base2),
    ):
        print(f"| {name} | {s['val_loss']:.4f} | {s['val_bpb']:.4f} | {s['steps']} | {t:.0f} |")
    print(
        f"| sweep best: trial {best['trial']} | {best_run['val_loss']:.4f} | {best_run['val_bpb']:.4f} | "
        f"{best_run['steps']} | {t_sweep:.0f} (all {len(sweep['trials'])} trials) |"
    )
    print(f"trials: {states}")
    print(
        "best settings: "
        + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    )
    imp = sweep.get("importance") or {}
    print(
        "importance (PED-ANOVA): "
        + (", ".join(f"{k} {v:.2f}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1])) or "none")
    )
    gain = min(b["val_loss"] for b in baselines) - best_run["val_loss"]
    print(
        f"sweep best vs the better baseline: {gain:+.4f} nats of validation loss "
        f"({'better' if gain >= 0 else 'worse'}); plots in {out / 'sweep'}"
    )


if __name__ == "__main__":
    main()
