"""The compiled float32 decoding step's two packages side by side: its products as ATen's (MKL's) matrix products,
and tuned (gradlm/model/aot.py, TUNED: inductor times each product as ATen's and as its own C++ GEMM template,
weights in the template's blocks, and takes the faster), with the eager step beside them.

Builds both in a fresh cache, then decodes greedily through gradlm's engine, alternating the three in one process:
eager, the step of ATen's products for every batch, and the step as gradlm opens it (tuned up to aot.tuned_rows()
rows, or --tuned-rows; past those rows the two compiled columns run the same code). Prompts, run and counting as
benchmarks/llamacpp.py (--new-tokens per row, prefill included, median of --repeats); "same tokens" compares each
row's greedy tokens with the eager step's.

    python benchmarks/decode_forms.py --run RUN           # the table in docs/benchmarks.md
    python benchmarks/decode_forms.py --run RUN --batches 8,16,32,64 --tuned-rows 64   # where tuning stops winning
    python benchmarks/decode_forms.py --run RUN --batches 1,4,8,16,32 --threads 1 --tuned-rows 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradlm.generation.engine import Engine
from gradlm.model import aot
from gradlm.rundir import load_model
from gradlm.runtime import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags, cpu_name  # noqa: E402
from llamacpp import benchmark_run, gradlm_decode, shakespeare_lines  # noqa: E402  (the same run and prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="", help="run directory (default: train one, as benchmarks/llamacpp.py does)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--tuned-rows", type=int, default=0, help="the most rows the tuned package takes (0: tuned_rows())")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="gradlm-forms-"))
    os.environ["GRADLM_CACHE"] = str(tmp / "cache")
    model, tok = load_model(benchmark_run(args.run, tmp))
    model.float().eval()
    print(
        f"machine: {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"{model.cfg.n_layer} x {model.cfg.d_model}, greedy, {args.new_tokens} new tokens a row, median of "
        f"{args.repeats}"
    )
    if args.tuned_rows:
        aot.tuned_rows = lambda: args.tuned_rows
    engines = {"eager": Engine(model, tok)}
    shipped = aot.forms
    try:
        for name, forms in (("ATen's products", lambda int8: [("float32-aten", aot.MAX_ROWS)]), ("tuned", shipped)):
            aot.forms = forms  # what the step asks while this engine's step opens
            engine = Engine(model, tok, runtime=Runtime("cpu", "float32", decode_step="build"))
            engine.forward.check()
            if engine.forward.step is None:
                sys.exit(f"the compiled step ({name}) did not open: see the warning above")
            engines[name] = engine
    finally:
        aot.forms = shipped
    step = engines["tuned"].forward.step
    blocked = sum(aot.BLOCKS in fqn for fqn in step.consts["float32"])
    print(f"tuned: up to {aot.tuned_rows()} rows, {blocked} of the step's weights in the GEMM template's blocks")
    lines = shakespeare_lines()
    names = list(engines)
    print("\n| batch | " + " | ".join(f"{k} tokens/s" for k in names) + " | tuned / ATen's | same tokens |")
    print("|---:|" + "---:|" * len(names) + "---:|---|")
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [tok.encode(lines[i * 7 % len(lines)])[:48] for i in range(B)]
        rates, tokens = {k: [] for k in engines}, {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, engine in engines.items():
                start = time.perf_counter()
                tokens[name] = gradlm_decode(engine, prompts, args.new_tokens)
                rates[name].append(B * args.new_tokens / (time.perf_counter() - start))
        med = {k: statistics.median(v[1:]) for k, v in rates.items()}
        same = all(tokens[k] == tokens["eager"] for k in names)
        print(
            f"| {B} | " + " | ".join(f"{med[k]:,.0f}" for k in names) + f" | {med[names[2]] / med[names[1]]:.2f}x | "
            f"{'identical' if same else 'differ'} |"
        )


if __name__ == "__main__":
    main()
