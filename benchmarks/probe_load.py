"""The --size auto probe beside a busy neighbour: the choice for a time budget, quiet and with one core busy.

Runs `autosize.choose` with the trainer's `Probe` on the run's own data (Shakespeare's cached tokens by
default), first on a quiet machine, then while a process that never sleeps holds one core, alternating
--repeats times, and prints the model and the tokens the budget buys each time.

    python benchmarks/probe_load.py                    # --max-time 120 (make demo's budget), 2 repeats
    python benchmarks/probe_load.py --max-time 60 --repeats 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from gradlm.training import autosize
from gradlm.training.config import TrainConfig
from gradlm.text.data import resolve_data, windows
from gradlm.training.optim import fast_matmul_dtype


def choice(data: str, seconds: float) -> str:
    d = resolve_data(TrainConfig(data=data, vocab_size=autosize.choose_vocab(10**6)), log=lambda m: None)
    tokens, val = d.tokens("train"), d.tokens("val")

    def sample(batch: int, block: int):
        starts = torch.randint(0, len(tokens) - block, (batch,), generator=torch.Generator().manual_seed(0))
        return windows(tokens, starts, block)

    bf16 = fast_matmul_dtype("cpu") == torch.bfloat16
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else __import__("contextlib").nullcontext
    probe = autosize.Probe(sample, autocast, "cpu", limit_s=0.05 * seconds)
    c = autosize.choose(
        autosize.Allowance(seconds=seconds), len(tokens), probe, d.tokenizer.vocab_size, {}, max_block=len(val) - 1
    )
    m = c.model
    shape = f"{m['n_layer']} x {m['d_model']}, batch {c.train['batch']}"
    return f"{shape}, {c.tokens / 1e6:.2f}M tokens at {c.tokens_per_s:,.0f} tok/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--max-time", type=float, default=120.0, help="the budget in seconds")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeats):
        rows.append(("quiet", choice(args.data, args.max_time)))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        try:
            rows.append(("one busy core", choice(args.data, args.max_time)))
        finally:
            busy.kill()
    print(f"\n--size auto for --max-time {args.max_time:g}s on {args.data}\n\n| machine | choice |\n|---|---|")
    for name, text in rows:
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main()
