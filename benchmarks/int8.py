"""Decoding on the CPU with int8 weights (`--dtype int8`) against float32: speed and what it costs in quality.

Takes a run (--run; by default trains one: 6 layers x 320 on Shakespeare for 200 steps, as
benchmarks/llamacpp.py does) and decodes greedily through gradlm's engine twice, side by side in one process,
alternating: float32 weights, and int8 copies of the matrices (one scale per output column, activations
quantized per call: torch's dynamic quantization, gradlm/model/infer.py). Prompts are Shakespeare lines; every row
decodes --new-tokens tokens, no early stop; each figure is the median of --repeats runs after a warm-up.
Quality: the greedy tokens that equal float32's (row by row, up to the first difference) and the bits per
byte of both on held-out Shakespeare (the last 10%, non-overlapping windows, teacher-forced).

    python benchmarks/int8.py                             # the table in docs/benchmarks.md
    python benchmarks/int8.py --run runs/shakes --batches 1,8,16
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradlm.generation.engine import Engine
from gradlm.model import infer
from gradlm.model.infer import Forward
from gradlm.rundir import load_model
from gradlm.runtime import Runtime
from gradlm.model.scoring import byte_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags, cpu_name  # noqa: E402
from llamacpp import benchmark_run, gradlm_decode as decode, shakespeare_lines, shakespeare_text  # noqa: E402  (the same run and prompts as that benchmark)


@torch.inference_mode()
def bits_per_byte(forward: Forward, model, ids: list[int], byte_lengths: torch.Tensor) -> float:
    """Teacher-forced bits per byte of ids in non-overlapping windows of the context, through forward."""
    block, bits, nbytes = model.cfg.block_size, 0.0, 0.0
    seq = torch.tensor(ids)
    for start in range(0, len(seq) - block - 1, block):
        x, y = seq[start : start + block][None], seq[start + 1 : start + block + 1][None]
        logits = forward(x, model.new_cache(1, block)).float()
        nll = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="none")
        b, n = byte_bits(nll, y[0], byte_lengths)
        bits, nbytes = bits + float(b), nbytes + float(n)
    return bits / nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="", help="run directory (default: train a small one on Shakespeare)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = benchmark_run(args.run, Path(tempfile.mkdtemp(prefix="gradlm-int8-")))
    model, tok = load_model(run)
    text, lines = shakespeare_text(), shakespeare_lines()
    held_out = tok.encode(text[int(len(text) * 0.9) :][:60_000])
    byte_lengths = torch.tensor(tok.token_byte_lengths())
    fp32, int8 = Engine(model, tok), Engine(model, tok, runtime=Runtime("cpu", "int8"))
    n = args.new_tokens
    print(
        f"model: {run} ({model.num_params() / 1e6:.1f}M parameters, {model.cfg.n_layer} x {model.cfg.d_model}, vocab "
        f"{model.cfg.vocab_size})"
    )
    print(
        f"machine: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); "
        f"greedy, {n} new tokens per row, median of {args.repeats}\n"
    )
    print("| batch | float32 tokens/s | int8 tokens/s | int8 / float32 | greedy tokens equal to float32's |")
    print("|---:|---:|---:|---:|---|")
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [tok.encode(lines[i * 7 % len(lines)])[:48] for i in range(B)]
        a, b = decode(fp32, prompts, n), decode(int8, prompts, n)  # warm-up
        times = {"fp32": [], "int8": []}
        for _ in range(args.repeats):
            for name, engine in (("fp32", fp32), ("int8", int8)):
                t0 = time.perf_counter()
                out = decode(engine, prompts, n)
                times[name].append(time.perf_counter() - t0)
                a, b = (out, b) if name == "fp32" else (a, out)
        same = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))
        f, i = (B * n / statistics.median(times[k]) for k in ("fp32", "int8"))
        print(
            f"| {B} | {f:,.0f} | {i:,.0f} | {i / f:.2f}x | {same / (B * n):.1%} "
            f"({sum(x == y for x, y in zip(a, b))}/{B} rows whole) |"
        )
    bpb = {
        name: bits_per_byte(e.forward, model, held_out, byte_lengths) for name, e in (("fp32", fp32), ("int8", int8))
    }
    kernels = {"int8": "dynamic quantization"}
    if infer.Int8.weight_only:  # the kernel few rows take: score every window through it too
        infer.WEIGHT_ONLY_ROWS, rows = model.cfg.block_size, infer.WEIGHT_ONLY_ROWS
        bpb["weight-only"] = bits_per_byte(Forward(model, int8=True), model, held_out, byte_lengths)
        infer.WEIGHT_ONLY_ROWS = rows
        kernels["weight-only"] = f"the weight-only kernel (bf16 activations) that batches of up to {rows} rows take"
    print(f"\nheld-out bits per byte ({len(held_out):,} tokens, Shakespeare's last 10%): float32 {bpb['fp32']:.4f}")
    for name, kernel in kernels.items():
        d = bpb[name] - bpb["fp32"]
        per_byte = math.exp(d * math.log(2)) - 1
        print(f"  int8 by {kernel}: {bpb[name]:.4f} ({d:+.4f}, {per_byte:+.2%} in perplexity per byte)")


if __name__ == "__main__":
    main()
