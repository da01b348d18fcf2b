"""The decoder-only transformer: ids -> embeddings -> N x (attention + MLP) -> norm -> logits.

The architecture is Llama's exactly (RMSNorm before each sub-layer, rotary position embeddings,
SwiGLU MLP, no biases), with Qwen3's per-head QK-norm, grouped-query attention and tied embeddings as
options. Parameter names follow the Hugging Face modules (q_proj, gate_proj, input_layernorm, ...), so
export is a key prefix and nothing else: weight-for-weight.

Depends on torch and gradlm.errors only. Example:
    >>> cfg = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4)
    >>> model = Transformer(cfg)
    >>> logits = model(torch.zeros(1, 8, dtype=torch.long))   # (batch, time, vocab)
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradlm.errors import ConfigError, check_field_types


@dataclass
class ModelConfig:
    """Shape of the transformer. Saved as the "model" section of a run's config.json."""

    vocab_size: int = field(default=1030, metadata={"help": "number of token ids (bytes + merges + special tokens)"})
    block_size: int = field(default=256, metadata={"help": "context window: the most tokens the model attends over"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_kv_head: int = field(
        default=0, metadata={"help": "key/value heads (grouped-query attention); 0 = same as --n-head"}
    )
    d_model: int = field(default=128, metadata={"help": "width of the residual stream (embedding size)"})
    d_ff: int = field(
        default=0, metadata={"help": "hidden width of the SwiGLU MLP; 0 = about 8/3 x d_model, rounded up to 32"}
    )
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalise queries and keys per head (Qwen3 style)"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share the input embedding with the output head"})
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on attention and residual branches (a regulariser; on CPU rounded to a multiple of 1/256)"
        },
    )

    def __post_init__(self):
        check_field_types(self)
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if not self.d_ff:
            self.d_ff = 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head > 0 and self.d_model % self.n_head:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        elif self.n_head > 0 and self.head_dim % 2:
            problems.append(f"head size d_model/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ConfigError("invalid model configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF does) so bf16 runs match the reference closely. F.rms_norm is the
        # same arithmetic (x * rsqrt(mean(x^2) + eps), bit-identical here) in one kernel: half the time of
        # the separate ops, though only ~1-2% of a training step.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim), laid out as HF does: the two halves repeat."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, D) by the angles in cos/sin (B or 1, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for max_len positions.

    Rows of a batch may be left-padded: pad[b] leading positions of row b are padding, never attended
    to, and row b's real tokens get rotary positions 0, 1, ... so padding changes nothing.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32, pad=None):
        # Keys and values share one tensor, (n_layer, B, 2 * n_kv_head, max_len, head_dim): keys in the
        # first n_kv_head heads, values in the rest, so the generation path writes both in one copy.
        self.kv = torch.zeros(cfg.n_layer, batch, 2 * cfg.n_kv_head, max_len, cfg.head_dim, device=device, dtype=dtype)
        self.n_kv_head = cfg.n_kv_head
        self.max_len = max_len
        self.pos = 0
        self.pad = None if pad is None else torch.as_tensor(pad, device=device, dtype=torch.long)
        self._bias: torch.Tensor | None = None
        self.max_pad = int(self.pad.max()) if self.pad is not None and self.pad.numel() else 0
        self._layers: list | None = None  # per-layer views, made on first use

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end, n = self.pos + k.shape[2], self.n_kv_head
        self.kv[layer, :, :n, self.pos : end] = k
        self.kv[layer, :, n:, self.pos : end] = v
        return self.kv[layer, :, :n, :end], self.kv[layer, :, n:, :end]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer: (keys and values (B, 2 * n_kv_head, max_len, head_dim), keys, values) views."""
        if self._layers is None:
            n = self.n_kv_head
            self._layers = [(self.kv[i], self.kv[i, :, :n], self.kv[i, :, n:]) for i in range(self.kv.shape[0])]
        return self._layers

    def first(self, length: int) -> KVCache:
        """Its first `length` positions as a cache of their own: the same memory, the same padding tensor."""
        view = copy.copy(self)
        view.kv, view.max_len, view._layers, view._bias = self.kv[:, :, :, :length], length, None, None
        return view

    def pad_bias(self) -> torch.Tensor:
        """Additive attention bias (B, 1, 1, max_len): -inf on each row's padding keys, 0 elsewhere.
        Built once per cache rather than per decoding step; valid for queries past every row's padding."""
        if self._bias is None:
            keys = torch.arange(self.max_len, device=self.kv.device)
            self._bias = torch.zeros(self.pad.shape[0], 1, 1, self.max_len, device=self.kv.device, dtype=self.kv.dtype)
            self._bias.masked_fill_(keys[None, None, None, :] < self.pad[:, None, None, None], float("-inf"))
        return self._bias

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (used when finished sequences leave a batch)."""
        rows = torch.as_tensor(rows, device=self.kv.device, dtype=torch.long)
        self.kv = self.kv.index_select(1, rows)
        self._layers = None
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)
            self._bias = None
            self.max_pad = int(self.pad.max()) if self.pad.numel() else 0

    def lengths(self) -> list[int]:
        """Real (not padding) tokens held by each row."""
        if self.pad is None:
            return [self.pos] * self.kv.shape[1]
        return [self.pos - p for p in self.pad.tolist()]


EXPLICIT_ATTENTION_MAX_CONTEXT = 128  # measured faster up to here; from 256 on, SDPA's flash kernel is as fast


def _explicit_attention_pays(device: str, T: int) -> bool:
    """True under bf16 autocast on CPU for contexts up to EXPLICIT_ATTENTION_MAX_CONTEXT. There autocast
    runs SDPA in float32 through its CPU flash kernel, the slowest part of a small model's training step;
    two plain products make the whole step 1.2-1.3x faster at context 64-128, and no faster at 256
    (benchmarks/train_step.py; docs/benchmarks.md, "Where a training step's time goes")."""
    if device != "cpu" or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    return T <= EXPLICIT_ATTENTION_MAX_CONTEXT


def dropout(x: torch.Tensor, p: float, training: bool, noise: RandomBytes | None = None) -> torch.Tensor:
    """Inverted dropout. On CPU the keep mask comes from random bytes (four per 32-bit draw), ~3x cheaper
    than F.dropout, whose random numbers cost more than the rest of a small model's dropout; p is rounded
    to a multiple of 1/256 there (0.1 drops 26/256 = 10.2%) and the scale matches the rounded p. The bytes are
    drawn here, or taken from noise: the step's bytes drawn before it (a compiled step; Transformer.forward)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    drop = min(255, round(p * 256))  # bytes below this are dropped
    if noise is not None:
        return x * _scaled_keep(noise.take(x.numel()).view(x.shape), x.dtype, drop)
    return x * (_eager_keep_mask() if torch.compiler.is_compiling() else _keep_mask)(x.shape, x.dtype, drop)


def random_bytes(n: int) -> torch.Tensor:
    """n random bytes (uint8) from torch's CPU generator, four from each 32-bit draw."""
    return torch.randint(-(2**31), 2**31, (_words(n),), dtype=torch.int32).view(torch.uint8)[:n]


def _words(n: int) -> int:
    """The 32-bit draws that n random bytes take."""
    return (n + 3) // 4


class RandomBytes:
    """A training step's dropout bytes, drawn before the step (Transformer.dropout_bytes counts them): each dropout
    takes the next ones. A compiled step reads them as an input, where drawing inside it broke the graph at every
    dropout (1.14x over eager for a 5 x 224 step with dropout 0.1, against 1.7x without dropout)."""

    def __init__(self, data: torch.Tensor):
        self.data, self.used = data, 0

    def take(self, n: int) -> torch.Tensor:
        """The next n bytes; the rest of their last 32-bit draw is skipped, as a dropout drawing its own leaves it."""
        if self.used + n > self.data.numel():
            raise ValueError(f"the step's dropout bytes ran out ({self.data.numel()} drawn, {self.used + n} needed)")
        part = self.data[self.used : self.used + n]
        self.used += 4 * _words(n)
        return part


def _keep_mask(shape: torch.Size, dtype: torch.dtype, drop: int) -> torch.Tensor:
    """dropout's scaled keep mask, drawn eagerly: a compiled step without noise calls it through _eager_keep_mask()."""
    return _scaled_keep(random_bytes(shape.numel()).view(shape), dtype, drop)


@functools.cache
def _eager_keep_mask():
    """_keep_mask as a compiled graph calls it: eagerly, a graph break (compiled, these random bytes cost ~85 ms of a
    5 x 224 step and inductor's own random numbers more). Made on first use: torch.compiler.disable imports
    torch._dynamo, ~1 s that every command would pay as it imports the model."""
    return torch.compiler.disable(_keep_mask)


def _scaled_keep(data: torch.Tensor, dtype: torch.dtype, drop: int) -> torch.Tensor:
    """The keep mask of random bytes: 256 / (256 - drop) where a byte is at least drop, else 0."""
    return (data >= drop).to(dtype) * (256 / (256 - drop))


_CAUSAL_BIAS: dict[int, torch.Tensor] = {}


def _causal_bias(T: int) -> torch.Tensor:
    """(T, T) float32: 0 where query i may see key j <= i, -inf above the diagonal; built once per length (eager).
    Compiled, it is built in the graph: a guard on the dict's contents recompiled the step once it was filled (11.6 s
    more of compiling the second step with an empty cache)."""
    if torch.compiler.is_compiling():
        return torch.full((T, T), float("-inf")).triu(1)
    if T not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[T] = torch.full((T, T), float("-inf")).triu(1)
    return _CAUSAL_BIAS[T]


def explicit_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, noise: RandomBytes | None = None
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v as two batched products, for q (B, H, T, D) and k, v (B, Hkv, T, D):
    the same function as SDPA with is_causal=True. Scores and softmax stay float32 (scores rounded to
    bf16 cost ~0.01 bits/char at equal steps); under autocast the second product runs in its dtype."""
    B, H, T, D = q.shape
    if k.shape[1] != H:  # grouped-query attention: each key/value head serves H / Hkv query heads
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float().reshape(B * H, T, D), k.float().reshape(B * H, T, D)
        scores = torch.baddbmm(_causal_bias(T).to(q.device).expand(B * H, T, T), q, k.transpose(1, 2), alpha=D**-0.5)
        probs = torch.softmax(scores, dim=-1)
    probs = dropout(probs, dropout_p, training=True, noise=noise)  # the identity when dropout_p is 0
    return torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, T, D)


def projections(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x through several projections (q, k, v; gate, up). On the CPU while gradients are on (training), when they
    are plain nn.Linear without bias: one product with their weights stacked, split after; fewer, larger products make
    a 4 x 192 bf16 training step 1.04x faster eager and 1.07-1.10x compiled (docs/benchmarks.md, "The training step,
    second pass"). Otherwise (decoding, scoring: stacking would copy the weights at every token; adapters, int8
    copies; GPUs, not measured) one product each."""
    plain = all(type(layer) is nn.Linear and layer.bias is None for layer in layers)
    if plain and x.device.type == "cpu" and torch.is_grad_enabled():
        stacked = F.linear(x, torch.cat([layer.weight for layer in layers]))
        return stacked.split([layer.out_features for layer in layers], dim=-1)
    return tuple(layer(x) for layer in layers)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, KV, T, D) of x, the queries and keys normed (if qk_norm) and
        rotated to their positions: what attention compares (gradlm inspect reads its maps from these)."""
        B, T, _ = x.shape
        q, k, v = projections(x, self.q_proj, self.k_proj, self.v_proj)
        # (B, T, H*D) -> (B, H, T, D)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, noise: RandomBytes | None = None):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None and mask is None and T > 1 and _explicit_attention_pays(q.device.type, T):
            y = explicit_causal_attention(q, k, v, dropout_p, noise)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=dropout_p,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, D) -> (B, T, H*D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = projections(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache, layer, noise: RandomBytes | None = None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, noise)
        x = x + dropout(attended, self.dropout, self.training, noise)
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training, noise)


class Transformer(nn.Module):
    """The decoder-only transformer, the Llama architecture weight for weight (RMSNorm, rotary positions,
    grouped-query attention, SwiGLU): what `gradlm.GPT` has always named; `gradlm export` writes it as
    Hugging Face's LlamaForCausalLM and as GGUF."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth; norms start at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = (
                    std / math.sqrt(2 * self.cfg.n_layer)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else std
                )
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        reduction: str = "mean",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids. Returns logits (B, T, V), or (B, 1, V) with last_only; with targets
        (B, T) it returns the cross-entropy instead (mean over tokens, or per token with
        reduction="none"; targets of -1 are ignored). noise: dropout's random bytes for this forward (training on
        the CPU), dropout_bytes(B, T) of them drawn by random_bytes; without, each dropout draws its own."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context window of {self.cfg.block_size}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache's {cache.max_len} positions")
        x = self.embed_tokens(idx)
        cos, sin, mask = self.rope_and_mask(idx, start, T, cache, x.dtype)
        noise = RandomBytes(noise) if noise is not None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, noise)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        logits = self.lm_head(x).float()
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return loss if reduction != "none" else loss.view(B, T)

    def dropout_bytes(self, B: int, T: int) -> int:
        """How many random bytes a training forward of (B, T) tokens takes for its dropout on the CPU, under the
        autocast in effect (it decides whether attention's probabilities drop through explicit_causal_attention)."""
        cfg = self.cfg
        if cfg.dropout == 0:
            return 0
        probs = B * cfg.n_head * T * T if T > 1 and _explicit_attention_pays(self.lm_head.weight.device.type, T) else 0
        return cfg.n_layer * 4 * (_words(probs) + 2 * _words(B * T * cfg.d_model))  # each dropout's whole draws

    def rope_and_mask(self, idx: torch.Tensor, start: int, T: int, cache: KVCache | None, dtype):
        """Rotary cos/sin for positions start..start+T-1, (1 or B, 1, T, D), and the attention mask
        (None = plain causal, handled by SDPA's is_causal)."""
        mask = None
        if cache is not None and cache.pad is not None:
            if T == 1 and start >= cache.max_pad:  # decoding step past all padding: per-row position start - pad[b]
                pos = start - cache.pad  # (B,)
                cos = self.rope_cos.index_select(0, pos).view(-1, 1, 1, self.cfg.head_dim)  # (B, 1, 1, D)
                sin = self.rope_sin.index_select(0, pos).view(-1, 1, 1, self.cfg.head_dim)
                mask = cache.pad_bias()[..., : start + 1]
            else:
                # Per-row positions: row b's first real token is position 0 (B, T).
                pos = (torch.arange(start, start + T, device=idx.device)[None] - cache.pad[:, None]).clamp(min=0)
                cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, D)
                mask = self._mask(start, T, cache.pad, idx.device)
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, D)
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, D)
            if cache is not None and start > 0 and T > 1:
                mask = self._mask(start, T, None, idx.device)
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin, mask

    @staticmethod
    def _mask(start: int, T: int, pad: torch.Tensor | None, device) -> torch.Tensor:
        """Boolean (B or 1, 1, T, start+T) mask: query i sees keys j <= start+i, and not row b's padding."""
        q = torch.arange(start, start + T, device=device)[:, None]
        k = torch.arange(start + T, device=device)[None, :]
        allowed = (k <= q)[None, None]
        if pad is not None:
            allowed = allowed & (k[None, None] >= pad[:, None, None, None])
            allowed = allowed | (k == q)[None, None]  # a padding query attends to itself: no empty rows
        return allowed

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights as gradlm saves them (a tied head is stored once). ValueError on any mismatch."""
        state = dict(state)
        if self.cfg.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
        self.load_state_dict(state)

    def new_cache(self, batch: int, max_len: int | None = None, pad=None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size, p.device, p.dtype, pad)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return flops_per_token(self.cfg, seq_len)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matrix multiplications per token: every projection and the output head (the
    input embedding is a lookup; the norms are elementwise)."""
    d, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    return cfg.n_layer * (2 * d * cfg.n_head * cfg.head_dim + 2 * d * kv + 3 * d * cfg.d_ff) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.d_model * (seq_len or cfg.block_size)
