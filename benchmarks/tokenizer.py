"""Tokenizer speed on the Shakespeare corpus: training, and encoding with tiktoken vs HF tokenizers.

Both encoders are built from the same merges and must give identical ids (checked here too).
Interleaved repeats, median reported, ratio tiktoken : HF.

    python benchmarks/tokenizer.py [--vocab-size 1024 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gradlm.text.corpus import locate
from gradlm.text.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    text = locate(a.data).read_text(encoding="utf-8")
    mb = len(text.encode()) / 1e6
    t0 = time.perf_counter()
    tok = Tokenizer.train([text], a.vocab_size)
    train_s = time.perf_counter() - t0
    lines = text.splitlines(keepends=True)
    fast, slow, fast_batch, slow_batch = [], [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ids_fast = tok.encode(text)
        fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids_slow = tok.hf.encode(text, add_special_tokens=False).ids
        slow.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.encode_batch(lines)
        fast_batch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.hf.encode_batch(lines, add_special_tokens=False)
        slow_batch.append(time.perf_counter() - t0)
    assert ids_fast == ids_slow, "tiktoken and HF disagree"
    f, s, fb, sb = (statistics.median(x) for x in (fast, slow, fast_batch, slow_batch))
    print(
        f"corpus {a.data}: {mb:.2f} MB -> {len(ids_fast):,} tokens ({len(text.encode()) / len(ids_fast):.2f} "
        f"bytes/token), vocab {tok.vocab_size}"
    )
    print(f"train (HF tokenizers BpeTrainer): {train_s:.2f} s = {mb / train_s:.2f} MB/s")
    print("| encoder | one string MB/s | per line (batch) MB/s |\n|---|---:|---:|")
    print(f"| tiktoken (gradlm's fast path) | {mb / f:.1f} | {mb / fb:.1f} |")
    print(f"| HF tokenizers | {mb / s:.1f} | {mb / sb:.1f} |")
    print(f"| ratio tiktoken : HF | {s / f:.1f}x | {sb / fb:.1f}x |")


if __name__ == "__main__":
    main()
