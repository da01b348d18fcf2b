"""Fine-tuning on the drug QA data: a base model, then full, frozen-layer and LoRA fine-tuning from it.

Runs the gradlm commands the README shows, one after another in --out, and prints a Markdown table:
trainable parameters, optimizer state, fine-tuning wall time and exact-match accuracy per split
(train / heldout / misspelled) from `gradlm eval --qa`, free replies and replies constrained to the answers the
QA data holds (`--answers choices`). Every command is printed before it runs, so the table can be reproduced by hand.

    python benchmarks/finetune.py --out /tmp/ftbench            # the figures in docs/benchmarks.md
    OMP_NUM_THREADS=1 python benchmarks/finetune.py --out /tmp/ftbench
    python benchmarks/finetune.py --out /tmp/ftdtype --dtype-study --seeds 1,2,3
        # float32 against bfloat16: a base in each dtype, then the full fine-tune in each dtype and seed
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

QA = Path(__file__).resolve().parents[1] / "examples" / "drugqa"
SPLITS = ("train", "heldout", "misspelled")

BASE = [
    "--vocab-size",
    "512",
    "--n-layer",
    "4",
    "--d-model",
    "128",
    "--n-head",
    "4",
    "--block-size",
    "128",
    "--batch",
    "16",
    "--max-steps",
    "300",
    "--lr",
    "3e-3",
    "--eval-every",
    "100",
    "--val-fraction",
    "0.1",
]
COMMON = ["--batch", "32", "--val-fraction", "0.05", "--eval-every", "50", "--warmup-steps", "10"]
RUNS = {  # name: finetune flags
    "full": ["--method", "full", "--lr", "1e-3", "--max-epochs", "10"],
    "freeze": ["--method", "freeze", "--train-top", "2", "--lr", "3e-3", "--max-epochs", "10"],
    "lora": ["--method", "lora", "--lora-rank", "16", "--lr", "1e-2", "--weight-decay", "0", "--max-epochs", "10"],
    "lora-20ep": ["--method", "lora", "--lora-rank", "16", "--lr", "1e-2", "--weight-decay", "0", "--max-epochs", "20"],
}


def gradlm(*args: str) -> float:
    """Run a gradlm command (printed first); returns its wall time in seconds."""
    cmd = ["gradlm", *args]
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "gradlm", *args], check=True)
    return time.time() - t0


def accuracy(run: Path, answers: str = "free") -> dict[str, float]:
    """Exact match per split; with answers="choices" also "<split> choices": replies constrained to the QA data's
    answers."""
    out = run / "qa.json"
    files = [str(QA / f"{s}.jsonl") for s in SPLITS]
    print(
        "$ " + shlex.join(["gradlm", "eval", str(run), "--qa", *files, "--answers", answers]),
        file=sys.stderr,
        flush=True,
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlm",
            "eval",
            str(run),
            "--qa",
            *files,
            "--answers",
            answers,
            "--json",
            "--no-progress",
            "--batch",
            "64",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    out.write_text(res.stdout)
    report = json.loads(res.stdout)
    acc = {s: v["accuracy"] for s, v in report["qa"]["splits"].items()}
    acc.update({f"{s} choices": v["accuracy"] for s, v in report.get("qa_choices", {}).get("splits", {}).items()})
    return acc


def dtype_study(out: Path, seeds: list[int]) -> None:
    """The README's base + full fine-tune with every combination of base dtype and fine-tuning dtype, the
    fine-tune repeated over seeds: exact match per split, mean and spread over the seeds."""
    import statistics

    dtypes = ("float32", "bfloat16")
    rows = []
    for base_dtype in dtypes:
        base = out / f"base-{base_dtype}"
        if not (base / "summary.json").is_file():
            gradlm(
                "train",
                "--data",
                str(QA / "facts.txt"),
                "--out",
                str(base),
                *BASE,
                "--dtype",
                base_dtype,
                "--no-progress",
            )
        for ft_dtype in dtypes:
            accs = []
            for seed in seeds:
                run = out / f"full-{base_dtype}-{ft_dtype}-{seed}"
                if not (run / "summary.json").is_file():
                    gradlm(
                        "finetune",
                        str(base),
                        "--data",
                        str(QA / "train.jsonl"),
                        "--out",
                        str(run),
                        *COMMON,
                        *RUNS["full"],
                        "--dtype",
                        ft_dtype,
                        "--seed",
                        str(seed),
                        "--no-progress",
                    )
                accs.append(accuracy(run))
            rows.append((base_dtype, ft_dtype, {s: [a[s] for a in accs] for s in SPLITS}))
    print(f"\nseeds {', '.join(map(str, seeds))}: mean exact match (min-max over the seeds)\n")
    print("| base dtype | fine-tuning dtype | train | heldout | misspelled |")
    print("|---|---|---:|---:|---:|")
    for base_dtype, ft_dtype, acc in rows:
        cells = [f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in (acc[s] for s in SPLITS)]
        print(f"| {base_dtype} | {ft_dtype} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the runs (must not hold them yet)")
    ap.add_argument(
        "--dtype-study", action="store_true", help="compare float32 and bfloat16 (base and full fine-tune) over --seeds"
    )
    ap.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds of --dtype-study")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dtype_study:
        return dtype_study(out, [int(s) for s in args.seeds.split(",")])
    rows = []
    base = out / "base"
    t = gradlm("train", "--data", str(QA / "facts.txt"), "--out", str(base), *BASE)
    s = json.loads((base / "summary.json").read_text())
    rows.append(
        {
            "name": "base (facts.txt as text)",
            "trainable": None,
            "state": None,
            "time": t,
            "steps": s["steps"],
            **accuracy(base, "choices"),
        }
    )
    for name, flags in RUNS.items():
        run = out / name
        t = gradlm("finetune", str(base), "--data", str(QA / "train.jsonl"), "--out", str(run), *COMMON, *flags)
        s = json.loads((run / "summary.json").read_text())
        rows.append(
            {
                "name": name,
                "trainable": s["trainable_params"],
                "full": s["full_finetune_params"],
                "state": s["optimizer_state_bytes"],
                "time": t,
                "steps": s["steps"],
                **accuracy(run, "choices"),
            }
        )
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\nCPU threads: {threads}\n")
    print(
        "exact match per split: free replies / replies constrained to the answers the QA data holds (--answers "
        "choices)\n"
    )
    print("| model | trainable parameters | AdamW state | steps | wall time (s) | train | heldout | misspelled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        trainable = "—" if r["trainable"] is None else f"{r['trainable']:,} ({r['trainable'] / r['full']:.0%})"
        state = "—" if r["state"] is None else f"{r['state'] / 1e6:.2f} MB"
        cells = " | ".join(f"{r[s]:.3f} / {r[s + ' choices']:.3f}" for s in SPLITS)
        print(f"| {r['name']} | {trainable} | {state} | {r['steps']} | {r['time']:.0f} | {cells} |")


if __name__ == "__main__":
    main()
