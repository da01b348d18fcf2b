"""Quality at equal wall time: gradlm's defaults against nanoGPT's README CPU recipe, on the same text.

Side by side, in one run, on this machine:
  1. the reference: nanoGPT's CPU recipe for Shakespeare, character level (4 layers x 128, 2000 iterations),
     run from a checkout of github:karpathy/nanoGPT OUTSIDE this repository (--nanogpt, a git directory such as
     the one `fetch github:karpathy/nanoGPT` brings; its files are extracted to a temporary folder and run
     there, never copied into gradlm). Its wall time is T; its score is its own last validation loss
     (nats per character, 20 batches) in bits per character.
  2. ours: `gradlm train --data <first 90% of the text> --max-time T` with no model flags, then
     `gradlm eval --data <last 10%>` (every character of the held-out text), bits per character.
The split is nanoGPT's: the first 90% of the characters train, the last 10% are held out.

    python benchmarks/quality.py --nanogpt /work/.mirror/karpathy+nanoGPT/repo            # ~8 minutes
    python benchmarks/quality.py --nanogpt ... --minutes 10                                   # and a 10-minute run of
    ours
    python benchmarks/quality.py --nanogpt ... --corpus python-stdlib                         # another corpus: Python
    sources
    python benchmarks/quality.py --nanogpt ... --corpus path/to/text.txt                      # any UTF-8 text

It also measures this machine's matrix-multiply peak in the dtype training uses (the best of a few shapes
like the model's own), and reports the share of it that the chosen model's training reaches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine import cpu_name

RECIPE = [
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def corpus_text(path: str) -> str:
    if path == "python-stdlib":  # a corpus unlike Shakespeare: the standard library's own modules, ~1.1 MB
        import sysconfig

        text, limit = "", 1_100_000
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text += f.read_text(encoding="utf-8", errors="replace")
            if len(text) >= limit:
                return text[:limit]
        return text
    if path:
        return Path(path).read_text(encoding="utf-8")
    from gradlm.text.datasets import resolve

    return resolve("shakespeare").read_text(encoding="utf-8")


def run_reference(git_dir: Path, text: str, work: Path) -> tuple[float, float]:
    """nanoGPT's recipe in a temporary extraction of its repository: (wall seconds, validation bits/char)."""
    src = work / "nanogpt"
    src.mkdir()
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (src / "data" / "shakespeare_char" / "input.txt").write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=src, check=True, capture_output=True)
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "train.py", "config/train_shakespeare_char.py", *RECIPE],
        cwd=src,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{r.stderr[-2000:]}")
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", r.stdout)
    return wall, float(evals[-1][2]) / math.log(2)


def run_ours(train_txt: Path, val_txt: Path, seconds: float, out: Path) -> dict:
    gradlm = [sys.executable, "-m", "gradlm"]
    t0 = time.time()
    r = subprocess.run(
        [
            *gradlm,
            "train",
            "--data",
            str(train_txt),
            "--out",
            str(out),
            "--max-time",
            f"{seconds:.0f}s",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"gradlm train failed:\n{r.stderr[-2000:]}")
    e = subprocess.run(
        [*gradlm, "eval", str(out), "--data", str(val_txt), "--json", "--no-progress"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(e.stdout)
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    from gradlm.model.transformer import ModelConfig, flops_per_token

    flops = flops_per_token(ModelConfig.from_dict(config["model"]))
    dtype = summary["dtype"]
    return {
        "wall_s": wall,
        "train_s": summary["time_s"],
        "bpc": report["clean"]["bits_per_char"],
        "tokens_per_s": summary["tokens_per_s"],
        "model": config["model"],
        "size": config.get("size", {}).get("reason", ""),
        "gflops": summary["tokens_per_s"] * flops / 1e9,
        "dtype": dtype,
        "step_tokens": summary["tokens"] // max(summary["steps"], 1),
    }


def _rate(shapes: list[tuple[int, int, int]], dtype) -> float:
    """GFLOP/s of running these matrix products (m x k @ k x n) one after another, best of 5 rounds."""
    import torch

    mats = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = 0.0
    for r in range(6):
        t0 = time.perf_counter()
        for a, b in mats:
            a @ b
        if r:  # the first round warms up
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_peaks(dtype_name: str, model: dict, tokens: int) -> tuple[float, float]:
    """This machine's matrix-multiply rates in GFLOP/s for the dtype training uses: at the model's own
    forward shapes (tokens x width through each projection and the head: what its training is made of),
    and the best over larger shapes (the machine's peak)."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    d, f, v, L = model["d_model"], model["d_ff"], model["vocab_size"], model["n_layer"]
    kv = model["n_kv_head"] * d // model["n_head"]
    own = [(tokens, d, d + 2 * kv), (tokens, d, d), (tokens, d, 2 * f), (tokens, f, d)] * L + [(tokens, d, v)]
    big = max(_rate([shape] * 4, dtype) for shape in ((4096, 512, 1536), (2048, 1024, 1024), (4096, 1024, 4096)))
    return _rate(own, dtype), big


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, help="git directory of a nanoGPT checkout (outside this repository)")
    ap.add_argument(
        "--corpus",
        default="",
        help="a UTF-8 text file, or python-stdlib (this Python's standard library modules, ~1.1 MB); default: the "
        "shakespeare dataset",
    )
    ap.add_argument("--minutes", type=float, default=0, help="also train ours for this many minutes")
    ap.add_argument(
        "--reference",
        default="",
        metavar="SECONDS,BPC",
        help="reuse a reference measured on this machine instead of running it again",
    )
    args = ap.parse_args()
    text = corpus_text(args.corpus)
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.txt").write_text(text[:cut], encoding="utf-8")
        (work / "val.txt").write_text(text[cut:], encoding="utf-8")
        cpu = cpu_name()
        print(f"machine: {cpu}, {os.cpu_count()} cores; corpus {len(text):,} characters (90% train / 10% held out)")
        if args.reference:
            T, ref_bpc = (float(v) for v in args.reference.split(","))
        else:
            T, ref_bpc = run_reference(Path(args.nanogpt), text, work)
        print(f"reference (nanoGPT CPU recipe): {T:.0f} s, {ref_bpc:.3f} bits/char (its last validation loss)")
        rows = [("nanoGPT README CPU recipe", T, ref_bpc, "4 layers x 128, char-level, 2000 iterations")]
        for seconds in [T] + ([args.minutes * 60] if args.minutes else []):
            o = run_ours(work / "train.txt", work / "val.txt", seconds, work / f"ours-{seconds:.0f}")
            m = o["model"]
            own, peak = matmul_peaks(o["dtype"], m, o["step_tokens"])
            share = o["gflops"] / own
            print(
                f"gradlm, --max-time {seconds:.0f}s: {o['bpc']:.3f} bits/char on the held-out 10% ({o['train_s']:.0f} "
                f"s training, {o['wall_s']:.0f} s with data preparation)"
            )
            print(f"  {o['size']}")
            print(
                f"  training {o['gflops']:.0f} GFLOP/s = {share:.0%} of the {o['dtype']} matmul rate at the model's "
                f"own shapes ({own:.0f} GFLOP/s), "
                f"{o['gflops'] / peak:.0%} of the machine's {o['dtype']} matmul peak ({peak:.0f} GFLOP/s at large "
                "shapes)"
            )
            rows.append(
                (
                    f"gradlm train --max-time {seconds:.0f}s (no model flags)",
                    seconds,
                    o["bpc"],
                    f"{m['n_layer']} layers x {m['d_model']}, context {m['block_size']}, vocab {m['vocab_size']}, "
                    f"{o['dtype']}, {o['tokens_per_s']:,.0f} tok/s = {share:.0%} of the matmul rate at its shapes",
                )
            )
    print("\n| run | budget (s) | held-out bits/char | model |\n|---|---:|---:|---|")
    for name, secs, bpc, what in rows:
        print(f"| {name} | {secs:.0f} | {bpc:.3f} | {what} |")


if __name__ == "__main__":
    main()
