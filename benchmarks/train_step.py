"""One training step (forward, backward, AdamW) on CPU: attention by SDPA vs by two explicit products.

Under bf16 autocast on a CPU, torch runs scaled_dot_product_attention in float32 through its flash kernel;
gradlm's model takes `explicit_causal_attention` there instead (float32 scores and softmax, the product with
the values in bf16). This times the whole step both ways, interleaved, on the same weights and batch, for
model shapes that `--size auto` picks, and reports the ratio. Not a test: figures go in docs/benchmarks.md.

    python benchmarks/train_step.py                     # the default shapes
    python benchmarks/train_step.py --shapes 4x192x128x8 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch

import gradlm.model.transformer as model_module
from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.training.optim import build_optimizer
from machine import cpu_name

PATHS = {"sdpa": 0, "explicit": model_module.EXPLICIT_ATTENTION_MAX_CONTEXT}  # the context limit that selects each path


def time_steps(shape: tuple[int, int, int, int], path: str, steps: int, bf16: bool) -> tuple[float, float]:
    """(seconds per step, loss after the steps) for (layers, width, context, batch), from seed 0."""
    n_layer, d_model, block, batch = shape
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=1024, n_layer=n_layer, d_model=d_model, n_head=d_model // 32, block_size=block)
    )
    opt = build_optimizer(model, "adamw", 3e-3, 0.1, 0.9, (0.9, 0.95))
    x = torch.randint(0, 1024, (batch, block))
    model_module.EXPLICIT_ATTENTION_MAX_CONTEXT = PATHS[path]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(), step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return (time.perf_counter() - t0) / steps, loss


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
    args = ap.parse_args()
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
