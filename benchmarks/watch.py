"""What watching a run costs the training: tokens/s with and without `gradlm watch` and its viewers, and what
the evaluation samples (samples.jsonl) cost.

Trains the same run (seeded; Shakespeare, the `make demo` model's shape: 4 layers, d_model 192, context 128,
vocab 1024, batch 32) --rounds times in each of two ways, alternating so both see the same load from anything
else on the machine:
  alone     `gradlm train` and nothing else;
  watched   `gradlm train` while `gradlm watch RUN --wait` (its own process, as `train --watch` starts it)
            streams the run to --viewers clients, each reading the page's server-sent events as a browser does.
Each training runs --steps steps with an evaluation (and a sample) every --eval-every; tokens/s is the run's own
figure from summary.json (training steps only, evaluations excluded) and the wall time is the whole command's.
The viewers count the rows they receive, to show they were fed throughout, and the watcher's own CPU time is
read from /proc: the direct cost, which the machine's noise cannot hide.

Then, in this process, one evaluation and one sample of the same model are timed (median of 5): what writing
samples.jsonl adds to each evaluation.

    python benchmarks/watch.py                       # the figures in docs/benchmarks.md
    python benchmarks/watch.py --rounds 5 --viewers 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from machine import cpu_name

SHAPE = [
    "--n-layer",
    "4",
    "--d-model",
    "192",
    "--n-head",
    "6",
    "--block-size",
    "128",
    "--batch",
    "32",
    "--vocab-size",
    "1024",
]


def gradlm(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradlm", *args], **kw)


def viewer(url: str, counts: list[int], i: int, stop: threading.Event) -> None:
    """One browser's worth of reading: the SSE stream, every message counted, until told to stop."""
    while not stop.is_set():
        try:
            with httpx.stream("GET", url + "events", timeout=httpx.Timeout(5.0, read=30.0)) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        counts[i] += line.count('"step"')
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            time.sleep(0.2)  # the run's folder appears a moment after the watcher starts


def train_once(out: Path, args, kind: str) -> dict:
    watched = kind == "watched"
    cmd = [
        "train",
        "--data",
        "shakespeare",
        "--out",
        str(out),
        "--max-steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--seed",
        "0",
        "--no-progress",
        "--no-plots",
        *SHAPE,
        *(["--sample-tokens", "0"] if kind == "silent" else []),
    ]
    watcher, stop, counts, threads = None, threading.Event(), [0] * args.viewers, []
    if watched:
        watcher = gradlm("watch", str(out), "--wait", "--port", "0", stdout=subprocess.PIPE, text=True)
        url = watcher.stdout.readline().split()[-1]
        for i in range(args.viewers):
            threads.append(threading.Thread(target=viewer, args=(url, counts, i, stop), daemon=True))
            threads[-1].start()
    t0 = time.perf_counter()
    p = gradlm(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"training failed:\n{err[-2000:]}")
    cpu = 0.0
    if watched:
        time.sleep(1.0)  # the last rows reach the viewers
        stop.set()
        fields = Path(f"/proc/{watcher.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, start-up included
        watcher.terminate()
        watcher.wait()
    s = json.loads((out / "summary.json").read_text())
    return {
        "tokens_per_s": s["tokens_per_s"],
        "wall_s": wall,
        "rows_seen": min(counts) if counts else 0,
        "watcher_cpu_s": cpu,
    }


def sample_cost(tmp: str) -> tuple[float, float]:
    """Median seconds of one evaluation and of one sample (--sample-tokens 48) of the demo-shaped model."""
    from gradlm.cli import build_parser, typed_configs
    from gradlm.model.transformer import ModelConfig
    from gradlm.training.config import TrainConfig
    from gradlm.training.monitor import write_sample
    from gradlm.training.trainer import Trainer

    args = build_parser().parse_args(
        ["train", "--data", "shakespeare", "--out", str(Path(tmp) / "timing"), "--seed", "0", "--no-progress", *SHAPE]
    )
    (model_cfg, cfg), _ = typed_configs(args, ModelConfig, TrainConfig)
    t = Trainer(model_cfg, cfg, log=lambda m: None).build()
    t.out.mkdir(parents=True, exist_ok=True)
    evals, samples = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        t.evaluate()
        evals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_sample(t)
        samples.append(time.perf_counter() - t0)
    t.close_run_dir()
    return statistics.median(evals), statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--viewers", type=int, default=2)
    args = ap.parse_args()
    cpu = cpu_name()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; {args.steps} steps, evaluation every {args.eval_every}, "
        f"{args.viewers} viewers, {args.rounds} rounds alternating"
    )
    results: dict[str, list[dict]] = {"alone": [], "watched": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in list(results) if r % 2 == 0 else list(results)[::-1]:
                out = Path(tmp) / f"{kind}-{r}"
                results[kind].append(train_once(out, args, kind))
                x = results[kind][-1]
                print(
                    f"round {r + 1} {kind:>7}: {x['tokens_per_s']:,.0f} tok/s, {x['wall_s']:.1f} s wall"
                    + (
                        f", each viewer got {x['rows_seen']} rows, watcher CPU {x['watcher_cpu_s']:.2f} s"
                        if kind == "watched"
                        else ""
                    ),
                    flush=True,
                )
        eval_s, sample_s = sample_cost(tmp)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    wall = {k: statistics.median(x["wall_s"] for x in v) for k, v in results.items()}
    print("\n| | tokens/s (median) | wall s (median) |\n|---|---:|---:|")
    for k in results:
        print(f"| {k} | {med[k]:,.0f} | {wall[k]:.1f} |")
    cpu = statistics.median(x["watcher_cpu_s"] for x in results["watched"])
    print(
        f"\nwatched / alone: {med['watched'] / med['alone']:.3f}x tokens/s, {wall['watched'] / wall['alone']:.3f}x "
        "wall time"
    )
    print(
        f"the watcher's own CPU time: {cpu:.2f} s over {wall['watched']:.1f} s ({100 * cpu / wall['watched']:.1f}% of "
        "one core, its start-up included)"
    )
    print(
        f"one evaluation {1000 * eval_s:.0f} ms, one sample of 48 tokens {1000 * sample_s:.0f} ms "
        f"(+{100 * sample_s / eval_s:.0f}% per evaluation)"
    )


if __name__ == "__main__":
    main()
