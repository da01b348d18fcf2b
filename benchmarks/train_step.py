"""One training step (forward, backward, AdamW) on CPU: SDPA vs explicit attention, or compiled vs eager.

Under bf16 autocast on a CPU, torch runs scaled_dot_product_attention in float32 through its flash kernel;
gradlm's model takes `explicit_causal_attention` there instead (float32 scores and softmax, the product with
the values in bf16). This times the whole step both ways, interleaved, on the same weights and batch, for
model shapes that `--size auto` picks, and reports the ratio. Not a test: figures go in docs/benchmarks.md.

    python benchmarks/train_step.py                     # the default shapes
    python benchmarks/train_step.py --shapes 4x192x128x8 --repeats 5
    python benchmarks/train_step.py --compile            # torch.compile (the trainer's --compile on) against eager

--compile times, per shape, the step as the trainer runs it (its model, bf16 autocast where the CPU has it) eager and
compiled with `torch.compile(model)`, each in a fresh process: once with an empty inductor cache (cold: what a first
run pays) and once with the cache that run left (warm: every later run of the shape). Compile time is the first
compiled steps' time less as many eager steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import gradlm.model.transformer as model_module
from gradlm.model.transformer import Transformer, ModelConfig, random_bytes
from gradlm.training.optim import build_optimizer
from machine import cpu_name

PATHS = {"sdpa": 0, "explicit": model_module.EXPLICIT_ATTENTION_MAX_CONTEXT}  # the context limit that selects each path


def setup(
    shape: tuple[int, int, int, int], dropout: float = 0.0
) -> tuple[Transformer, torch.optim.Optimizer, torch.Tensor]:
    """The model, its AdamW (fused, as the trainer's) and a batch for (layers, width, context, batch), from seed 0."""
    n_layer, d_model, block, batch = shape
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=1024, n_layer=n_layer, d_model=d_model, n_head=d_model // 32, block_size=block, dropout=dropout
    )
    model = Transformer(cfg)
    opt = build_optimizer(model, "adamw", 3e-3, 0.1, 0.9, (0.9, 0.95), fused=True)  # the trainer's, on the CPU too
    return model, opt, torch.randint(0, 1024, (batch, block))


def train_step(
    model, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool, noise: Transformer | None = None
) -> float:
    """One step (forward, backward, AdamW) of model (the module or its compiled form) on x; its loss. noise: the
    module, when the step's dropout bytes are drawn before it and passed in, as the trainer does for a compiled step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        extra = {"noise": random_bytes(noise.dropout_bytes(*x.shape))} if noise is not None else {}
        loss = model(x, x, **extra)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(shape: tuple[int, int, int, int], path: str, steps: int, bf16: bool) -> tuple[float, float]:
    """(seconds per step, loss after the steps) for (layers, width, context, batch), from seed 0."""
    model, opt, x = setup(shape)
    model_module.EXPLICIT_ATTENTION_MAX_CONTEXT = PATHS[path]
    train_step(model, opt, x, bf16), train_step(model, opt, x, bf16)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, opt, x, bf16)
    return (time.perf_counter() - t0) / steps, loss


def one_shape(shape: tuple[int, int, int, int], steps: int, dropout: float) -> None:
    """(--one, in a fresh process) eager and compiled seconds per step and the compile time, as JSON."""
    from gradlm.model.compiling import use_cache
    from gradlm.runtime import resolve

    bf16 = resolve(device="cpu").dtype == "bfloat16"  # the trainer's choice on this CPU
    use_cache()  # the caches as the trainer sets them up (the user's TORCHINDUCTOR_CACHE_DIR stays)
    model, opt, x = setup(shape, dropout)

    def timed(m, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(m, opt, x, bf16, noise=model if m is not model and dropout > 0 else None)
        return time.perf_counter() - t0

    timed(model, 2)
    eager = min(timed(model, steps) for _ in range(2)) / steps
    compiled = torch.compile(model)
    first = timed(compiled, 3)  # the first step compiles (and any step dynamo compiles again)
    best = min(timed(compiled, steps) for _ in range(2)) / steps
    again = min(timed(model, steps) for _ in range(2)) / steps  # eager again: the machine's drift
    print(json.dumps({"eager": min(eager, again), "compiled": best, "compile_s": first - 3 * best, "bf16": bf16}))


def products(shape: tuple[int, int, int, int], compiled: bool) -> None:
    """(--products) Where the step's time goes against its matrix products: the step (compiled or eager) under
    torch.profiler, its products' own time and FLOPs, and the share of the matmul rate the step reaches, as
    benchmarks/quality.py measures it (the model's forward shapes timed alone, hot) and as it would be if the step
    were nothing but its products."""
    from torch.profiler import ProfilerActivity, profile

    from gradlm.model.compiling import use_cache
    from gradlm.model.transformer import flops_per_token
    from quality import matmul_peaks

    use_cache()
    model, opt, x = setup(shape)
    run = torch.compile(model) if compiled else model
    for _ in range(4):
        train_step(run, opt, x, True)
    t0 = time.perf_counter()
    for _ in range(8):
        train_step(run, opt, x, True)
    step_s = (time.perf_counter() - t0) / 8
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(4):
            train_step(run, opt, x, True)
    product_s = product_flops = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        s = e.input_shapes
        if e.key == "aten::mm":
            flops = 2 * s[0][0] * s[0][1] * s[1][1]
        elif e.key == "aten::bmm":
            flops = 2 * s[0][0] * s[0][1] * s[0][2] * s[1][2]
        elif e.key in ("aten::baddbmm", "aten::addmm"):
            flops = 2 * math.prod(s[1]) * s[2][-1]
        else:
            continue
        product_s += e.self_cpu_time_total / 1e6 / 4
        product_flops += flops * e.count / 4
    step_flops = flops_per_token(model.cfg) * x.numel()
    cfg = model.cfg
    own, _ = matmul_peaks("bfloat16", cfg.to_dict(), x.numel())
    n_layer, d_model, block, batch = shape
    print(
        f"| {n_layer} x {d_model}, {block}, {batch} | {'compiled' if compiled else 'eager'} | {step_s * 1e3:.0f} | "
        f"{product_s * 1e3:.0f} | {product_flops / product_s / 1e9:.0f} | {own:.0f} | "
        f"{step_flops / step_s / 1e9 / own:.0%} | {step_flops / product_s / 1e9 / own:.0%} |",
        flush=True,
    )


def compile_times(shape: str, steps: int, dropout: float) -> None:
    """One row: eager vs compiled ms/step and the compile time, cold then warm, in fresh processes."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = []
        for _ in ("cold", "warm"):
            child = [sys.executable, __file__, "--one", shape, "--steps", str(steps), "--dropout", str(dropout)]
            out = subprocess.run(child, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    eager, compiled = min(cold["eager"], warm["eager"]), min(cold["compiled"], warm["compiled"])
    n_layer, d_model, block, batch = shape.split("x")
    print(
        f"| {n_layer} x {d_model}, {block}, {batch} | {'bf16' if cold['bf16'] else 'float32'} | {eager * 1e3:.0f} | "
        f"{compiled * 1e3:.0f} | {eager / compiled:.2f}x | {cold['compile_s']:.1f} | {warm['compile_s']:.1f} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes",
        default="4x192x128x8,5x224x128x16,6x256x256x8,8x384x256x16",
        help="LAYERSxWIDTHxCONTEXTxBATCH, comma separated",
    )
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements per path; the fastest counts")
    ap.add_argument(
        "--float32", action="store_true", help="time without bf16 autocast (the model then always uses SDPA)"
    )
    ap.add_argument("--compile", action="store_true", help="compiled vs eager, compile time cold and warm")
    ap.add_argument("--dropout", type=float, default=0.0, help="--compile: the model's dropout (the trainer's step)")
    ap.add_argument(
        "--products", action="store_true", help="the step's time against its matrix products and the matmul rate"
    )
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # --compile's child process: one shape
    args = ap.parse_args()
    if args.one:
        one_shape(tuple(int(v) for v in args.one.split("x")), args.steps, args.dropout)
        return
    if args.products:
        print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, bf16 autocast")
        print(
            "| layers x width, context, batch | step | ms/step | its products, ms (profiled) | products GFLOP/s | "
            "bf16 matmul rate at its shapes, GFLOP/s | share of the rate | share if only products |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for spec in args.shapes.split(","):
            for compiled in (False, True):
                products(tuple(int(v) for v in spec.split("x")), compiled)
        return
    if args.compile:
        print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print(
            "| layers x width, context, batch | autocast | eager ms/step | compiled ms/step | speed-up | "
            "compile s, cold cache | compile s, warm cache |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for spec in args.shapes.split(","):
            compile_times(spec, args.steps, args.dropout)
        return
    print(
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'float32' if args.float32 else 'bf16 autocast'}"
    )
    print(
        "| layers x width, context, batch | SDPA ms/step | explicit ms/step | speed-up | loss after, SDPA / explicit |"
    )
    print("|---|---:|---:|---:|---|")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        best = {p: (float("inf"), 0.0) for p in PATHS}
        for _ in range(args.repeats):
            for p in PATHS:
                t, loss = time_steps(shape, p, args.steps, not args.float32)
                best[p] = min(best[p], (t, loss))
        (ts, ls), (te, le) = best["sdpa"], best["explicit"]
        print(
            f"| {shape[0]} x {shape[1]}, {shape[2]}, {shape[3]} | {ts * 1e3:.0f} | {te * 1e3:.0f} | {ts / te:.2f}x | "
            f"{ls:.3f} / {le:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
