"""Generation speed: gradlm's decoding loop vs Hugging Face transformers' generate(), same weights.

Builds an ~8M-parameter gradlm model (seeded random weights: speed does not depend on what the
weights say), loads the same weights into transformers' LlamaForCausalLM (our architecture is Llama's,
parameter for parameter), then decodes greedily with both, side by side in one process, at batch 1
and batch 8 (prompts of different lengths, left-padded), the same number of new tokens, no early stop.
Tokens/s counts new tokens (batch x new tokens) over the whole call, prefill included; each figure is
the median of --repeats alternating runs after one warm-up run each. It also checks that both produce
the same tokens.

    python benchmarks/generate.py                      # the figures in docs/benchmarks.md
    python benchmarks/generate.py --new-tokens 64 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from gradlm.generation.engine import Engine, Request
from gradlm.model.infer import Forward
from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.model.sampling import SamplingConfig


def hf_model(model: Transformer):
    """transformers' LlamaForCausalLM holding exactly our weights (keys prefixed "model.")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).eval()
    state = {k if k.startswith("lm_head") else "model." + k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf


class ByteTokens:
    """The text edge's view of a tokenizer for this random-vocabulary model: every id one letter, no
    special tokens (so the engine's text edge does the work it does for real text)."""

    def __init__(self, vocab: int):
        self.pieces = [bytes([97 + i % 26]) for i in range(vocab)]
        self.specials: dict[str, int] = {}


class ModulePath(Forward):
    """The engine's forward on the module path, Transformer.forward(idx, cache=...), instead of the fused inference
    path: to measure what the fused path earns."""

    def __call__(self, idx, cache, last_only=False):
        return self.model(idx, cache=cache, last_only=last_only)


def module_path(engine: Engine) -> Engine:
    engine.forward = ModulePath(engine.model)
    return engine


def ours(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding of every prompt together through the engine (the path `gradlm generate` takes)."""
    engine.max_batch = len(prompts)
    cfg = SamplingConfig(temperature=0, max_new_tokens=n)
    return [[p.token.id for p in pieces] for pieces in engine.run([Request(ids, cfg) for ids in prompts])]


def theirs(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as generate() expects for decoder-only models
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, P:].tolist()


def matmul_floor(model: Transformer, B: int, n: int, repeats: int) -> float:
    """Seconds that n decoding steps at batch B spend in their weight matrix products alone (the fused
    path's own matrices and shapes: [q;k;v], o, [gate;up], down per layer, then the head), with nothing
    else: no attention, norms, rotary, sampling or Python loop. No implementation that multiplies by
    these fp32 weights with this BLAS can decode faster."""
    from gradlm.model.infer import inference_weights

    layers, head_t = inference_weights(model)[:2]
    x = torch.randn(B, model.cfg.d_model)
    y = {w.shape[0]: torch.randn(B, w.shape[0]) for layer in layers for w in layer[:4]}

    def steps():
        for _ in range(n):
            for w_qkv, w_o, w_gu, w_down, *_ in layers:
                torch.mm(x, w_qkv)
                torch.addmm(x, y[w_o.shape[0]], w_o)
                torch.mm(x, w_gu)
                torch.addmm(x, y[w_down.shape[0]], w_down)
            torch.mm(x, head_t)

    with torch.inference_mode():
        steps()
        return statistics.median(timed(steps)[0] for _ in range(repeats))


def timed(fn) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (median reported)")
    ap.add_argument("--batches", default="1,8", help="batch sizes to measure")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig(vocab_size=1030, block_size=512, n_layer=6, n_head=8, d_model=320)
    model = Transformer(cfg)
    model.reset_parameters(seed=args.seed)
    model.eval()
    hf = hf_model(model)
    tok = ByteTokens(cfg.vocab_size)
    fast, slow = Engine(model, tok), module_path(Engine(model, tok))
    gen = torch.Generator().manual_seed(args.seed)
    n = args.new_tokens

    print(
        f"model: {model.num_params() / 1e6:.1f}M parameters ({cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"{cfg.n_head} heads, vocab {cfg.vocab_size}), fp32"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python "
        f"{platform.python_version()}"
    )
    print(f"greedy, {n} new tokens per prompt, median of {args.repeats} runs\n")
    rows, floors = [], []
    for B in [int(b) for b in args.batches.split(",")]:
        lengths = [32] if B == 1 else [16 + (48 * b) // max(B - 1, 1) for b in range(B)]  # 16 .. 64 tokens
        prompts = [torch.randint(0, cfg.vocab_size, (L,), generator=gen).tolist() for L in lengths]
        a_out, b_out, m_out = ours(fast, prompts, n), theirs(hf, prompts, n), ours(slow, prompts, n)  # warm-up
        t_ours, t_hf, t_mod = [], [], []
        for _ in range(args.repeats):  # alternate, so all see the same machine load
            t, a_out = timed(lambda: ours(fast, prompts, n))
            t_ours.append(t)
            t, b_out = timed(lambda: theirs(hf, prompts, n))
            t_hf.append(t)
            t, m_out = timed(lambda: ours(slow, prompts, n))
            t_mod.append(t)
        same = sum(a == b == m for a, b, m in zip(a_out, b_out, m_out))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(a_out, b_out)]
        ours_tps, hf_tps, mod_tps = (B * n / statistics.median(ts) for ts in (t_ours, t_hf, t_mod))
        floor_tps = B * n / matmul_floor(model, B, n, args.repeats)
        rows.append((B, ours_tps, hf_tps, mod_tps, same, first_diff))
        floors.append((B, floor_tps, hf_tps, ours_tps))
    print(
        "| batch | gradlm tokens/s | transformers tokens/s | gradlm / transformers | gradlm module path tokens/s | "
        "fused / module path | same tokens |"
    )
    print(
        "|------:|----------------:|----------------------:|---------------------:|---------------------------:|-------------------:|:------------|"
    )
    for B, a, b, m, same, diffs in rows:
        note = f"{same}/{B} rows identical in all three" + (
            "" if same == B else f" (first differences at {[d for d in diffs if d is not None]})"
        )
        print(f"| {B} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | {m:,.0f} | {a / m:.2f}x | {note} |")
    print(
        "\nThe weight matrix products alone (no attention, norms, sampling or loop): the fastest any fp32 decoder on "
        "this BLAS can go"
    )
    print(
        "| batch | matmuls-only tokens/s | / transformers | gradlm's share of it |\n|------:|------:|------:|------:|"
    )
    for B, f, h, a in floors:
        print(f"| {B} | {f:,.0f} | {f / h:.2f}x | {a / f:.0%} |")
    if any(same != B for B, *_, same, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
