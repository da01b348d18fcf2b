"""Optimizer step time on this machine: AdamW vs Muon (ours with fp32 and bf16 Newton-Schulz, and torch.optim.Muon).

Side by side in one process, interleaved round-robin so machine noise hits every variant alike.
Reports the median time of optimizer.step() alone and of a whole training step (forward + backward +
step), and ratios to AdamW.

    python benchmarks/optim.py [--d-model 192 --n-layer 4 --repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.training.optim import build_optimizer


def variants(model):
    yield "adamw", build_optimizer(model, "adamw", lr=1e-4)
    yield "sgd", build_optimizer(model, "sgd", lr=1e-4)
    yield "momentum", build_optimizer(model, "momentum", lr=1e-4)
    for dtype in (torch.float32, torch.bfloat16):
        opt = build_optimizer(model, "muon", lr=1e-4, muon_lr=1e-4)
        opt.optimizers["muon"].ns_dtype = dtype
        yield f"muon (gradlm, {'fp32' if dtype == torch.float32 else 'bf16'} Newton-Schulz)", opt
    yield "muon (torch.optim.Muon, bf16)", build_optimizer(model, "muon", lr=1e-4, muon_lr=1e-4, muon_impl="torch")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1030)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layer=a.n_layer, n_head=a.n_head, block_size=a.block)
    )
    x = torch.randint(0, a.vocab, (a.batch, a.block))
    y = torch.roll(x, -1, 1)
    opts = dict(variants(model))
    step_t = {k: [] for k in opts}
    full_t = {k: [] for k in opts}
    for r in range(a.repeats + 2):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            loss = model(x, y)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if r >= 2:  # the first rounds warm up allocators and optimizer state
                step_t[name].append(t2 - t1)
                full_t[name].append(t2 - t0)
    from gradlm.training.optim import fast_matmul_dtype

    print(
        f"gradlm's Muon picks {fast_matmul_dtype('cpu')} for Newton-Schulz on this machine (from the CPU's bf16 "
        "features)"
    )
    print(
        f"model: d_model {a.d_model}, {a.n_layer} layers, {model.num_params():,} parameters; batch {a.batch} x "
        f"{a.block} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| optimizer | step() ms | vs adamw | whole train step ms | vs adamw |\n|---|---:|---:|---:|---:|")
    base_s, base_f = statistics.median(step_t["adamw"]), statistics.median(full_t["adamw"])
    for name in opts:
        s, f = statistics.median(step_t[name]), statistics.median(full_t[name])
        print(f"| {name} | {s * 1e3:.1f} | {s / base_s:.2f}x | {f * 1e3:.0f} | {f / base_f:.2f}x |")


if __name__ == "__main__":
    main()
