"""Data at scale: peak memory and speed of `gradlm tokenizer train` and `gradlm prepare` at growing corpus
sizes, side by side with raw tiktoken over the same text, and training from shards against one file.

The corpus is built outside the repo from this Python installation's own .py sources (copied as .txt, whole
copies of the tree until the size is reached). Peak RSS is the largest sum of the resident memory of the
command and all its worker processes, sampled every 0.1 s from /proc. Raw tiktoken runs in this process:
`encode_ordinary_batch` over the same files (read in 64 MB batches, on the same cores), with the run's
tokenizer's own tiktoken encoding: the ceiling gradlm's prepare is measured against.

    python benchmarks/scale.py --sizes 0.15,0.5,2 --work /tmp/gradlm-scale     # the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def build_corpus(folder: Path, gigabytes: float) -> int:
    """Copies of the stdlib's .py files as .txt under folder until it holds `gigabytes`; returns bytes."""
    if (folder / ".done").is_file():
        return int((folder / ".done").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    src = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in src.rglob("*.py") if p.is_file() and "site-packages" not in p.parts)
    total, copy = 0, 0
    while total < gigabytes * 1e9:
        for p in files:
            dst = folder / f"c{copy}" / p.relative_to(src).with_suffix(".txt")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
            total += dst.stat().st_size
            if total >= gigabytes * 1e9:
                break
        copy += 1
    (folder / ".done").write_text(str(total))
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and every process below it."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            pages = int((d / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        rss[int(d.name)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def measured(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS of the command's process tree) of a command that must succeed."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    p = subprocess.Popen(cmd)
    peak = 0
    while p.poll() is None:
        peak = max(peak, tree_rss(p.pid))
        time.sleep(0.1)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return time.time() - t0, peak


def raw_tiktoken(folder: Path, tokenizer: Path, threads: int) -> float:
    """Seconds raw tiktoken takes over every file (encode_ordinary_batch, 64 MB a batch)."""
    from gradlm.text.tokenizer import Tokenizer

    enc = Tokenizer.load(tokenizer)._tt
    files = sorted(p for p in folder.rglob("*.txt"))
    t0 = time.time()
    batch, size = [], 0
    for f in files:
        batch.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(batch[-1])
        if size > 64 << 20:
            enc.encode_ordinary_batch(batch, num_threads=threads)
            batch, size = [], 0
    if batch:
        enc.encode_ordinary_batch(batch, num_threads=threads)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.15,0.5,2", help="corpus sizes in GB")
    ap.add_argument("--work", default="/tmp/gradlm-scale", help="folder for the corpora and outputs (outside the repo)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument(
        "--train-steps",
        type=int,
        default=100,
        help="steps of the shards-against-one-file training comparison (0: skip)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of that comparison")
    args = ap.parse_args()
    work = Path(args.work)
    cores = os.cpu_count() or 1
    gradlm = [sys.executable, "-m", "gradlm"]
    rows = []
    for gb in (float(s) for s in args.sizes.split(",")):
        corpus = work / f"corpus-{gb:g}GB"
        nbytes = build_corpus(corpus, gb)
        tok = work / f"tok-{gb:g}GB.json"
        out = work / f"prepared-{gb:g}GB"
        tok.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        t_tok, rss_tok = measured(
            [
                *gradlm,
                "tokenizer",
                "train",
                "--data",
                str(corpus),
                "--vocab-size",
                str(args.vocab_size),
                "--out",
                str(tok),
            ]
        )
        t_prep, rss_prep = measured(
            [
                *gradlm,
                "prepare",
                "--data",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(out),
                "--workers",
                str(cores),
            ]
        )
        t_raw = raw_tiktoken(corpus, tok, cores)
        rows.append((gb, nbytes, t_tok, rss_tok, t_prep, rss_prep, t_raw))
        print(
            f"{gb:g} GB: tokenizer {t_tok:.0f}s {rss_tok / 1e9:.2f} GB | prepare {t_prep:.0f}s {rss_prep / 1e9:.2f} "
            f"GB | raw tiktoken {t_raw:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    print(f"\nmachine: {os.cpu_count()} cores; vocabulary {args.vocab_size}; prepare with {cores} workers\n")
    print(
        "| corpus | tokenizer train: time | MB/s | peak RSS | prepare: time | MB/s | peak RSS | raw tiktoken: time | "
        "MB/s | prepare / raw |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gb, n, t_tok, rss_tok, t_prep, rss_prep, t_raw in rows:
        mb = n / 1e6
        print(
            f"| {mb:,.0f} MB | {t_tok:.0f} s | {mb / t_tok:.1f} | {rss_tok / 1e9:.2f} GB | {t_prep:.0f} s | "
            f"{mb / t_prep:.1f} | {rss_prep / 1e9:.2f} GB | "
            f"{t_raw:.0f} s | {mb / t_raw:.1f} | {t_raw / t_prep:.2f}x |"
        )
    if args.train_steps:
        # the first corpus prepared twice: in 4M-token shards, and as one file; trained alternately, --repeats times
        gb = float(args.sizes.split(",")[0])
        data = {}
        for name, shard in (("shards", 1 << 22), ("one file", 1 << 40)):
            data[name] = work / f"prepared-{gb:g}GB-{name.replace(' ', '-')}"
            shutil.rmtree(data[name], ignore_errors=True)
            measured(
                [
                    *gradlm,
                    "prepare",
                    "--data",
                    str(work / f"corpus-{gb:g}GB"),
                    "--tokenizer",
                    str(work / f"tok-{gb:g}GB.json"),
                    "--out",
                    str(data[name]),
                    "--shard-tokens",
                    str(shard),
                ]
            )
        shape = [
            "--n-layer",
            "4",
            "--d-model",
            "192",
            "--n-head",
            "6",
            "--block-size",
            "128",
            "--batch",
            "16",
            "--max-steps",
            str(args.train_steps),
            "--eval-every",
            str(args.train_steps),
            "--eval-tokens",
            "4096",
            "--no-progress",
            "--no-plots",
        ]
        speed: dict[str, list[float]] = {"shards": [], "one file": []}
        for _ in range(args.repeats):
            for name in speed:
                run = work / f"train-{name.replace(' ', '-')}"
                shutil.rmtree(run, ignore_errors=True)
                r = subprocess.run(
                    [*gradlm, "train", "--data", str(data[name]), "--out", str(run), *shape],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                speed[name].append(float(r.stdout.split("(")[1].split(" tok/s")[0].replace(",", "")))
        n_shards = len(json.loads((data["shards"] / "meta.json").read_text())["splits"]["train"]["shards"])
        a, b = statistics.median(speed["shards"]), statistics.median(speed["one file"])
        print(
            f"\ntraining from {gb:g} GB ({args.train_steps} steps, median of {args.repeats} alternating runs): "
            f"{a:,.0f} tok/s from "
            f"{n_shards} shards, {b:,.0f} tok/s from one file ({a / b:.2f}x)"
        )


if __name__ == "__main__":
    main()
