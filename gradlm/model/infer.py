"""The inference fast path: what Transformer.forward(idx, cache=...) computes, in inference mode, faster.

Decoding one token at a time costs little arithmetic, so per-operation overhead and reading the weights
dominate. This path computes exactly what the module path (Transformer.forward with a KV cache) computes, up to
float rounding, with fewer and cheaper operations:
  - functional ops on (B*T, C) rows, no nn.Module calls or hooks;
  - pre-transposed contiguous weights (the faster layout for BLAS here); q/k/v and gate/up as one matmul
    each; every RMSNorm weight folded into the matmul after it; residual adds folded into addmm;
    queries and keys rotated together, in place;
  - RMSNorm's mean of squares from the vector norm (one fast reduction); int8 scales its product's rows instead.
It earns its place: greedy decoding of the benchmark's 8.1M model runs 1.9x faster than the module path
at batch 1 and 1.2x at batch 8, with identical tokens (benchmarks/generate.py, docs/benchmarks.md).
tests/test_generate.py checks it against the module path, with padding, GQA and QK-norm.

The model knows nothing of this path: the engine (gradlm/generation/engine.py) holds a Forward, which chooses it
and owns the weight copies it uses.

decode() is the plain one-row decoding loop over a KV cache (no batching, stops, penalties or constraints):
what training's samples use (gradlm/training/monitor.py), since training may not import the engine.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradlm.errors import cause
from gradlm.model import aot
from gradlm.model.compiling import Compiled
from gradlm.model.transformer import Transformer, KVCache
from gradlm.model.sampling import SamplingConfig, next_token


class Forward:
    """The forward over a KV cache that generation uses: logits (B, T or 1, V) of idx (B, T) appended to
    the cache. In eval mode without autograd it is fused_forward, with weight copies made on first use;
    otherwise Transformer.forward itself (int8 always takes the fused path: the module path has no int8 form). check()
    remakes the copies when any weight changed since they were made
    (training, load_state_dict, .to()): the engine calls it whenever it admits rows, not at every step,
    since the check costs ~0.1 ms and a decoding step a few. The copies cost one extra copy of the
    matrices while this Forward lives (two where the compiled float32 step reads them in inductor's blocks:
    aot._blocked).

    step: the compiled decoding step on the CPU (gradlm/model/aot.py), which takes every call it fits (one new token
    per row, past the first two positions; int8 up to aot.int8_rows() rows):
    "off"; "cached" (its package when one is in the cache); "background" (that, and if there is none, one is built
    in another process meanwhile, found at a later check()); "build" (built at the first check() if missing).
    On CUDA, "graphs": the one-token step recorded as CUDA graphs (GraphStep)."""

    def __init__(self, model: Transformer, int8: bool = False, compile: bool = False, step: str = "off"):
        self.model, self.int8 = model, int8
        self._key: tuple | None = None
        self._weights: tuple | None = None
        # compile: torch.compile the fused step (`--compile on` off the CPU), shapes dynamic (batch, prompt and cache
        # length vary); it says when it compiles and runs eagerly if compiling fails (gradlm/model/compiling.py)
        self._fused = Compiled(fused_forward, "the decode step", dynamic=True) if compile else fused_forward
        self.step_mode, self.step, self.building = step, None, None

    def __call__(self, idx: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        model = self.model
        if cache.pos + idx.shape[1] > min(model.cfg.block_size, cache.max_len):
            raise ValueError(
                f"sequence of {cache.pos + idx.shape[1]} tokens exceeds the context window ({model.cfg.block_size}) "
                f"or the KV cache ({cache.max_len})"
            )
        if (model.training or torch.is_grad_enabled()) and not self.int8:
            return model(idx, cache=cache, last_only=last_only)
        weights = self._weights or self.check()
        if self.step is not None and self.step.fits(idx, cache):
            return self.step(idx, cache)
        if self.step is not None:
            self.step.forget()  # the fused path writes into this cache: what a step holds of it would be stale
        return self._fused(model, weights, idx, cache, last_only)

    def check(self) -> tuple:
        """The inference weights (see inference_weights), remade if a weight's storage or in-place
        version changed since they were made; the compiled step opened or handed them."""
        key = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if key != self._key:
            self._weights, self._key = inference_weights(self.model, self.int8), key
            if self.step is not None:
                try:
                    self.step.load(self.model, self._weights)
                except ValueError:  # not the weights it was built for any more (.to(bfloat16), say): eager from now
                    self.step, self.step_mode = None, "off"
                except Exception as e:  # noqa: BLE001  (handing them over failed: eager from now, said once)
                    self.step, self.step_mode = None, "off"
                    aot.failed_load(e)
        if self.step is None and self.step_mode != "off":
            self._open_step()
        return self._weights

    def _open_step(self) -> None:
        model, mode = self.model, self.step_mode
        if mode == "graphs":  # CUDA: the one-token step recorded as CUDA graphs, with the weights as they are now
            records = model.embed_tokens.weight.device.type in GraphStep.devices and not self.int8
            self.step, self.step_mode = (GraphStep(model, self._weights), mode) if records else (None, "off")
            return
        if model.embed_tokens.weight.dtype != torch.float32 or (self.int8 and not Int8.weight_only):
            self.step_mode = "off"  # its forms: float32 weights, and int8 where the weight-only kernel is vectorised
            return
        self.step = aot.open_step(model, self._weights, self.int8, build_missing=mode == "build")
        if mode == "background" and self.building is None:  # what is missing (None when nothing is), for next time
            self.building = aot.build_in_background(model.cfg, self.int8)
        if self.step is None and mode == "build":
            self.step_mode = "off"  # it failed, and said so: not again


# Batch sizes a CUDA graph of the decoding step is recorded for: a batch replays the smallest that holds its rows.
GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64)
# The keys a graph attends over: GRAPH_SHORTEST, twice that, ... up to the context window; a step replays the shortest
# that holds its position (attention over the whole window read every key of every row at every token).
GRAPH_SHORTEST = 64


def graph_length(pos: int, block: int) -> int:
    """How many keys the graph for a step at position pos attends over."""
    length = GRAPH_SHORTEST
    while length <= pos and length < block:
        length *= 2
    return min(length, block)


def record_cuda_graph(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """run() recorded as a CUDA graph on the current device, after two warm-up runs on a side stream (as
    torch.cuda.graphs asks): (replay, the tensor run() returned, which each replay overwrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # its own capture stream on this device (torch's default one is made once, on whichever device came first), and
    # capture errors of this thread only (a server's other threads may use CUDA)
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
        out = run()
    return graph.replay, out


class GraphStep:
    """CUDA: the decoding step of one new token per row, recorded as a CUDA graph per batch size (GRAPH_ROWS) and
    replayed at every token. A small model's step at batch 1 is ~10 kernels a layer of a few microseconds each, so
    launching them one by one from Python is most of its time; a replay launches them all at once.

    A graph reads and writes fixed addresses: its batch's keys and values are a buffer of its own as long as the
    context window (its rows beyond the batch's compute nothing anyone reads), and the position and each row's padding
    are tensors its replay reads (fused_forward's pos=). Per batch size there is a graph for each length of keys it
    attends over (graph_length: 64, 128, ... up to the window), all on the one buffer. The cache a call passes stays
    the engine's: its keys and values are copied into the buffer when the buffer does not hold them already (another
    cache, rows reordered, a step taken outside the graph, a graph just recorded), then each replay's new keys and
    values are copied back, one position. Recorded on first use, in milliseconds (no compiler); the weights are
    inference_weights(model)'s, and load() (new weights) drops the graphs. A recording that fails says so in one line,
    and the step decodes eagerly from then on. record: how a graph is recorded (record_cuda_graph; the tests replay on
    the CPU by running the step again)."""

    record = staticmethod(record_cuda_graph)
    devices = ("cuda",)  # where it records

    def __init__(self, model: Transformer, weights: tuple):
        self.failed = False
        self.load(model, weights)

    def load(self, model: Transformer, weights: tuple) -> None:
        """The model's weights (new ones, or moved): the graphs recorded with the old ones are dropped. A ValueError
        when the model is no longer on a device this step records on."""
        self.device = model.embed_tokens.weight.device
        if self.device.type not in self.devices:
            raise ValueError(f"the model is on {self.device}; the graphs record on {', '.join(self.devices)}")
        self.model, self.weights = model, weights
        self.graphs: dict[tuple[int, int], tuple] = {}  # by (rows, length)
        self.buffers: dict[int, KVCache] = {}  # by rows: its keys and values, position and padding
        self.holds: dict[int, tuple] = {}  # by rows: (the cache's keys and values, weakly; the position) it holds

    def forget(self) -> None:
        """Something else wrote into a cache (the fused path): no buffer is taken to hold any cache any more."""
        self.holds.clear()

    def fits(self, idx: torch.Tensor, cache: KVCache) -> bool:
        same = cache.kv.dtype == self.model.embed_tokens.weight.dtype and cache.kv.device == self.device
        return idx.shape[1] == 1 and idx.shape[0] <= GRAPH_ROWS[-1] and same and not self.failed

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # on the model's device (another may be the current one: a graph records on the current one), in inference
        # mode (what it records and the buffers it fills are inference tensors, whoever calls)
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.inference_mode():
            return self._step(idx, cache)

    def _step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, at = idx.shape[0], cache.pos
        rows = next(r for r in GRAPH_ROWS if r >= B)
        key = rows, graph_length(at, self.model.cfg.block_size)
        if key not in self.graphs:
            self.holds.pop(rows, None)  # (recording runs the step, writing into the buffer: it is copied in again)
            try:
                self.graphs[key] = self._recorded(*key)
            except Exception as e:  # noqa: BLE001  (any failure to record: decode as written)
                self.failed = True
                print(
                    f"warning: recording the decoding step as a CUDA graph failed ({cause(e)}); "
                    "decoding without it (--compile off skips the attempt)",
                    file=sys.stderr,
                    flush=True,
                )
                return fused_forward(self.model, self.weights, idx, cache, False)
        replay, ids, pos, logits = self.graphs[key]
        buffer = self.buffers[rows]
        held, held_at = self.holds.get(rows, (None, None))
        if held is None or held() is not cache.kv or held_at != at:  # (a weak reference: never a freed cache's ids)
            buffer.kv[:, :B, :, :at].copy_(cache.kv[:, :, :, :at])
            # (the rows past B unpadded: a padding past the position would mask all of a row, which on CUDA may make
            # its keys and values NaN, and a NaN under a masked key still reaches a later batch: 0 x NaN)
            buffer.pad.zero_()
            if cache.pad is not None:
                buffer.pad[:B].copy_(cache.pad)
        ids[:B].copy_(idx)
        pos.fill_(at)
        replay()
        cache.kv.narrow(3, at, 1).copy_(buffer.kv[:, :B, :, at : at + 1])
        cache.pos = at + 1
        self.holds[rows] = (weakref.ref(cache.kv), at + 1)
        return logits[:B].clone()

    def _recorded(self, rows: int, length: int) -> tuple:
        model = self.model
        if rows not in self.buffers:
            self.buffers[rows] = model.new_cache(rows, model.cfg.block_size, pad=[0] * rows)
        keys = self.buffers[rows].first(length)  # (the buffer's memory)
        keys.pad.zero_()  # (recording runs at position 0: a row padded past it would have no key, and on CUDA NaNs)
        ids = torch.zeros(rows, 1, dtype=torch.long, device=keys.kv.device)
        pos = torch.zeros(1, dtype=torch.long, device=keys.kv.device)
        replay, logits = self.record(lambda: fused_forward(model, self.weights, ids, keys, False, pos=pos))
        logits.fill_(float("nan"))
        replay()
        if not bool(torch.isfinite(logits).all()):  # a graph that recorded nothing (another device's stream) replays
            raise RuntimeError("the recorded graph did not compute the step")  # nothing: its output stays as it was
        return replay, ids, pos, logits


@torch.no_grad()
def decode(
    model: Transformer,
    prompt: list[int],
    n: int,
    cfg: SamplingConfig,
    gen: torch.Generator | None = None,
    vocab_size: int | None = None,
    forward: Forward | None = None,
) -> list[int]:
    """The n ids that follow prompt, one at a time in a new KV cache: the prompt runs once, then each new
    id; next_token picks each (with gen). vocab_size: pick among the first vocab_size ids only (the ids a
    tokenizer has, where the model has more rows). forward: a Forward, or None for the model's own forward
    (what training uses: it follows the caller's autocast and makes no weight copies). The caller puts the
    model in eval mode; prompt + n must fit the context window."""
    step = forward or model
    cache = model.new_cache(1, len(prompt) + n)
    ids, new = torch.tensor([prompt], device=model.embed_tokens.weight.device), []
    for _ in range(n):
        logits = step(ids, cache=cache, last_only=True)[:, -1, :vocab_size]  # (1, V)
        ids = next_token(logits, cfg, gen)[:, None]  # (1, 1)
        new.append(ids)
    return torch.cat(new, 1)[0].tolist() if new else []  # one read from the device, not one per token


def fused_forward(
    model: Transformer,
    weights: tuple,
    idx: torch.Tensor,
    cache: KVCache,
    last_only: bool,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T or 1, V) of idx (B, T) appended to the cache: Transformer.forward(idx, cache=cache)'s
    result up to float rounding, by the fused operations described above, with weights from
    inference_weights(model). One body on purpose: it is the decode loop's hot path, read as one sequence of
    fused operations beside Transformer.forward (helpers would add a Python call per layer and per token).
    pos: the step a CUDA graph records (GraphStep), where no Python number may change between replays: one new
    token per row at the position pos (a (1,) tensor) of a cache whose pad is a tensor, attending over the whole
    cache with the keys past pos (and each row's padding) masked; cache.pos is left as it was."""
    B, T = idx.shape
    H, KV, D, C = model.cfg.n_head, model.cfg.n_kv_head, model.cfg.head_dim, model.cfg.d_model
    start, end, half = cache.pos, cache.pos + T, model.cfg.head_dim // 2
    layers, head_t, sin_signed, mean_of, eps_t, mm, addmm = weights
    x = F.embedding(idx, model.embed_tokens.weight).view(B * T, C)
    if pos is not None:  # each row's rotary position pos - pad[b]; its keys from pad[b] to pos
        at = pos - cache.pad
        cos, sin = model.rope_cos[at].view(B, 1, 1, D), sin_signed[at].view(B, 1, 1, D)
        keys = torch.arange(cache.max_len, device=idx.device)
        mask = ((keys <= pos) & (keys >= cache.pad[:, None])).view(B, 1, 1, cache.max_len)
        end = cache.max_len
    elif cache.pad is None and T == 1:  # the common decoding step: one position for every row
        cos, sin, mask = model.rope_cos.narrow(0, start, 1), sin_signed.narrow(0, start, 1), None  # (1, D)
    else:
        cos, sin, mask = model.rope_and_mask(idx, start, T, cache, x.dtype)
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    causal = mask is None and T > 1
    fp32, int8 = x.dtype == torch.float32, mm is _mm_int8

    def inv_rms(h):
        # 1 / RMS(h) per row in float32: RMSNorm(h) == h * inv_rms(h) * weight. One row: from the vector norm (3.2 us
        # for a row of 320 where .mean() takes 5.0, F.rms_norm 8.4 and a matmul with a column of 1/dim 7.8, BLAS's
        # slow path for one row); more rows: that matmul (the vector norm made a batch-8 step 2-4% slower).
        hf = h if fp32 else h.float()
        if hf.dim() == 2 and hf.shape[0] > 1:
            return torch.rsqrt_(torch.addmm(eps_t, hf * hf, mean_of))
        n = torch.linalg.vector_norm(hf, dim=-1, keepdim=True)
        return torch.rsqrt_(torch.addcmul(eps_t, n, n, value=1.0 / h.shape[-1]))

    def norm(h, w=None):
        # RMSNorm in float32. w=None: the weight is folded into the next matmul (see inference_weights).
        # Equal to the module path up to float rounding.
        hf = (h if fp32 else h.float()) * inv_rms(h)
        hf = hf if fp32 else hf.to(h.dtype)
        return hf if w is None else hf * w

    def normed(h, w):
        # norm(h) @ w (the norm's weight folded into w); int8 scales the product's rows instead of h's
        return w.times(h, inv_rms(h)) if int8 else mm(norm(h), w)

    for (w_qkv, w_o, w_gu, w_down, w_qn, w_kn), (kv_cache, k_cache, v_cache) in zip(layers, cache.layers()):
        qkv = normed(x, w_qkv)  # (B*T, (H+2KV)*D); the input norm's weight is in w_qkv
        if T == 1:
            qkv = qkv.view(B, H + 2 * KV, 1, D)
        else:
            qkv = qkv.view(B, T, H + 2 * KV, D).transpose(1, 2)  # (B, H+2KV, T, D)
        if w_qn is None:  # rotate queries and keys together, in place
            qk = qkv.narrow(1, 0, H + KV)
            rotated = qk.roll(half, -1)
            qk.mul_(cos).addcmul_(rotated, sin)
        else:
            for first, n, w in ((0, H, w_qn), (H, KV, w_kn)):
                part = qkv.narrow(1, first, n)
                part.copy_(norm(part, w))
                rotated = part.roll(half, -1)
                part.mul_(cos).addcmul_(rotated, sin)
        if pos is None:  # this token's keys and values
            kv_cache.narrow(2, start, T).copy_(qkv.narrow(1, H, 2 * KV))
        else:
            kv_cache.index_copy_(2, pos, qkv.narrow(1, H, 2 * KV))
        y = F.scaled_dot_product_attention(
            qkv.narrow(1, 0, H),
            k_cache.narrow(2, 0, end),
            v_cache.narrow(2, 0, end),
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=KV != H,
        )  # (B, H, T, D)
        y = y.reshape(B, H * D) if T == 1 else y.transpose(1, 2).reshape(B * T, H * D)
        x = addmm(x, y, w_o)  # x + attention (B*T, C)
        gate, up = normed(x, w_gu).chunk(2, 1)  # (B*T, d_ff) each; the post-attention norm's weight folded in
        x = addmm(x, F.silu(gate) * up, w_down)  # x + MLP
    if pos is None:
        cache.pos = end
    if last_only and T > 1:
        x = x.view(B, T, C)[:, -1]
        T = 1
    return normed(x, head_t).view(B, T, -1)  # the final norm's weight is in head_t


# Rows (batch x new tokens) up to which an int8 product takes torch's weight-only int8 kernel (activations in bf16,
# int8 weights with a bf16 scale per output column) instead of dynamic quantization, on CPUs where ATen runs its
# AVX512 kernels: at batch 1 its products take 0.33 ms a decoding step against dynamic quantization's 0.57 ms (2
# threads, the 6 x 320 model); at batch 8 it is the slower one (1.02 vs 0.75 ms). docs/benchmarks.md, "int8".
WEIGHT_ONLY_ROWS = 4


class Int8:
    """A matrix w (in, out) as int8 with one scale per output column (symmetric, round to nearest), in the two
    forms torch multiplies fast: packed for dynamic quantization (fbgemm: activations quantized per call), and
    (out, in) int8 with bf16 scales for the weight-only kernel (activations in bf16), which few rows take where
    ATen has its AVX512 kernels."""

    weight_only = torch.backends.cpu.get_cpu_capability() == "AVX512"  # its vectorised kernel; scalar elsewhere

    def __init__(self, w: torch.Tensor):
        w = w.t().contiguous()  # (out, in): the layout both take
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        with warnings.catch_warnings():  # torch >= 2.10 marks its quantized tensors deprecated; they still run, fast
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros_like(scale, dtype=torch.long)
            packed = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(packed, None)
        self.q, self.scale = (q, scale.to(torch.bfloat16)) if self.weight_only else (None, None)

    def times(self, a: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(a * row_scale) @ w, float32 (rows, out), for a (rows, in) float32 and row_scale (rows, 1) or None. The
        weight-only kernel scales the product's rows instead of a's (one operation fewer: bf16 times float32 is
        float32); dynamic quantization scales a first, since it quantizes all rows with one scale."""
        if self.q is not None and a.shape[0] <= WEIGHT_ONLY_ROWS:
            out = torch._weight_int8pack_mm(a.to(torch.bfloat16), self.q, self.scale)
            return out.float() if row_scale is None else torch.mul(out, row_scale)
        return torch.ops.quantized.linear_dynamic(a if row_scale is None else a * row_scale, self.packed)

    def add_to(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x + a @ w: in place into x (float32) when the weight-only kernel multiplies (no cast of its product)."""
        if self.q is not None and a.shape[0] <= WEIGHT_ONLY_ROWS:
            return x.add_(torch._weight_int8pack_mm(a.to(torch.bfloat16), self.q, self.scale))
        return x + torch.ops.quantized.linear_dynamic(a, self.packed)


def _mm_int8(a: torch.Tensor, w: Int8) -> torch.Tensor:
    return w.times(a)


def _addmm_int8(x: torch.Tensor, a: torch.Tensor, w: Int8) -> torch.Tensor:
    return w.add_to(x, a)


def inference_weights(model: Transformer, int8: bool = False) -> tuple:
    """The weights as the fused path uses them: per layer ([q;k;v]^T scaled by the input norm's
    weight, o^T, [gate;up]^T scaled by the post-attention norm's weight, down^T, q norm, k norm),
    the output head^T scaled by the final norm's weight, the rotary sin table with the first half
    of each row negated, the 1/dim column and the epsilon of the norms, and the two matrix products
    that multiply by the matrices. int8: the matrices (and the head) as int8 with a scale per output
    column, multiplied by dynamic quantization (CPU; see docs/benchmarks.md for its speed and cost)."""
    with torch.no_grad():
        layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            # (x * w) @ W^T == x @ (W * w)^T: each norm's weight scales the next matmul's inputs.
            w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            layers.append(
                (
                    (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) * w_in).t().contiguous(),
                    a.o_proj.weight.t().contiguous(),
                    (torch.cat([m.gate_proj.weight, m.up_proj.weight]) * w_post).t().contiguous(),
                    m.down_proj.weight.t().contiguous(),
                    a.q_norm.weight if a.qk_norm else None,
                    a.k_norm.weight if a.qk_norm else None,
                )
            )
        device, D = model.rope_sin.device, model.cfg.head_dim
        dtype = model.embed_tokens.weight.dtype
        sin_signed = torch.cat([-model.rope_sin[:, : D // 2], model.rope_sin[:, D // 2 :]], dim=1).to(dtype)
        mean_of = torch.full((model.cfg.d_model, 1), 1.0 / model.cfg.d_model, device=device)
        # a tensor: adding a Python float costs a conversion per call
        eps = torch.tensor([model.cfg.norm_eps], device=device)
        head_t = (model.lm_head.weight * model.norm.weight).t().contiguous()
        if not int8:
            return layers, head_t, sin_signed, mean_of, eps, torch.mm, torch.addmm
        layers = [(Int8(qkv), Int8(o), Int8(gu), Int8(down), qn, kn) for qkv, o, gu, down, qn, kn in layers]
        return layers, Int8(head_t), sin_signed, mean_of, eps, _mm_int8, _addmm_int8
