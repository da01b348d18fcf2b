"""Constrained decoding's per-token cost: choices, regex and JSON schema vs unconstrained decoding, batch 1 and 16.

Constraints need a real tokenizer (the mask is computed over its tokens' bytes), so this trains a gradlm
tokenizer on Shakespeare ($GRADLM_DATA_MIRROR/tinyshakespeare.txt, else --text) and builds a small model with
seeded random weights (speed does not depend on what the weights say). Each configuration runs its batch of
requests (temperature 1, one seed per row) through the engine; the timed part is the decode steps after the
first one (prefill excluded), and the figure is microseconds per generated token (wall time / tokens) and
the whole step's time, the median of --repeats runs. "mask" is the extra cost per token over unconstrained
decoding at the same batch size.

    python benchmarks/constrain.py                     # the table in docs/benchmarks.md
    python benchmarks/constrain.py --vocab 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gradlm.generation.constrain import make_constraint
from gradlm.generation.engine import Engine, Request
from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.model.sampling import SamplingConfig
from gradlm.text.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "drug": {"type": "string", "maxLength": 24},
        "dose_mg": {"type": "integer", "minimum": 1, "maximum": 2000},
        "class": {"enum": ["statin", "beta blocker", "ACE inhibitor", "anticoagulant"]},
    },
    "required": ["drug", "dose_mg", "class"],
    "additionalProperties": False,
}
KINDS = {
    "none": None,
    "choices": make_constraint(
        choices=["statin", "beta blocker", "ACE inhibitor", "anticoagulant", "proton pump inhibitor"]
    ),
    "regex": make_constraint(regex=r"[A-Z][a-z]{2,12}: [0-9]{1,4} mg( once| twice| three times)? daily"),
    "json_schema": make_constraint(json_schema=SCHEMA),
}


def timed_run(engine: Engine, tok: Tokenizer, batch: int, constraint, new_tokens: int) -> tuple[float, int, int]:
    """(seconds, tokens, steps) of the decode steps after the first, for batch rows of one configuration."""
    prompt = tok.encode("ROMEO:\nWhat dose of the potion, good friar?\n")
    requests = [
        Request(
            prompt,
            SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, seed=s),
            1,
            frozenset(),
            constraint=constraint,
        )
        for s in range(batch)
    ]
    done = [0]
    handles = [engine.submit(r, lambda p: done.__setitem__(0, done[0] + (p.finish is not None))) for r in requests]
    engine.step()  # admission (prefill) and the first token
    tokens, steps, t0 = engine.tokens, engine.steps, time.perf_counter()
    while done[0] < batch:
        engine.step()
    seconds = time.perf_counter() - t0
    for h in handles:
        h.cancel()
    return seconds, engine.tokens - tokens, engine.steps - steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=str(Path(os.environ.get("GRADLM_DATA_MIRROR", "data")) / "tinyshakespeare.txt"))
    ap.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    ap.add_argument(
        "--new-tokens", type=int, default=64, help="most tokens per row (unconstrained rows write all of them)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.train([Path(args.text).read_text(encoding="utf-8")], args.vocab)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tok), block_size=256, n_layer=4, n_head=4, d_model=256)).eval()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model {params / 1e6:.1f}M parameters, vocabulary {len(tok)}; {args.new_tokens} new tokens at most, median "
        f"of {args.repeats}\n"
    )
    print("| constraint | batch | tokens | rows / step | µs / token | ms / step | mask µs / token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 16):
        engine = Engine(model, tok, max_batch=batch)
        timed_run(engine, tok, batch, None, 8)  # warm-up
        base = None
        for name, constraint in KINDS.items():
            runs = [timed_run(engine, tok, batch, constraint, args.new_tokens) for _ in range(args.repeats)]
            us = statistics.median(s / max(n, 1) * 1e6 for s, n, _ in runs)
            ms_step = statistics.median(s / max(k, 1) * 1e3 for s, _, k in runs)
            tokens = statistics.median(n for _, n, _ in runs)
            base = us if constraint is None else base
            extra = "—" if constraint is None else f"{us - base:+.0f}"
            rows = statistics.median(n / max(k, 1) for _, n, k in runs)
            print(f"| {name} | {batch} | {tokens:.0f} | {rows:.1f} | {us:.0f} | {ms_step:.2f} | {extra} |")


if __name__ == "__main__":
    main()
