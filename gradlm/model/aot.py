"""The decoding step compiled ahead of time for the CPU (AOTInductor), kept in the cache for every model of its
shape.

Why: at batch 1 an eager decoding step is ~250 small ATen calls (norms, casts, rotary, the residual adds, views)
around ~25 matrix products, and each call costs microseconds of dispatch: a third to a half of the step. Compiled
into one C++ function, the elementwise work is fused into a few loops and nothing is dispatched from Python: a step
runs 1.4-1.7x as fast at batch 1, 1.4x at 8-16 (docs/benchmarks.md, "The compiled decoding step"). Measured and not
kept: torch.compile of the eager step with dynamic shapes (0.65x: slower than eager), of its pieces (0.7x: each
compiled call costs tens of microseconds), at fixed shapes with cpp_wrapper (1.2x: dynamo still checks ~50 guards a
call), and a graph that writes the new keys into the cache it is given (0.3x: it copied the whole cache each step).

What it computes: Transformer.forward(idx, cache) for one new token per row, rows left-padded, over a KV cache of
any length. The batch, the position and the cache's length are symbolic sizes, so one graph serves them all, and
attention reads only the keys the cache holds (masking the rest of the window cost 1.4x at position 100 of
512). Attention is written out so the graph only reads the cache: scores against the cached keys, the new key's
score beside them, one softmax over both; the new keys and values come back and the caller writes them. Weights
are the fused path's (gradlm/model/infer.py: norms folded into the products; int8 = its weight-only form), so the
tokens are the eager path's up to float rounding (tests/test_aot.py).

The package depends on the model's shape, the weights' form (float32 or int8), torch's version and the CPU's
capability, not on the weights: they are handed to it at load time (load_constants), so one build serves every
model of a shape. It lives in $GRADLM_CACHE/aot/, written whole or not at all. A float32 step is two packages: for
a few rows, products that are inductor's own C++ GEMM template where it times faster than ATen's (TUNED: MKL on an
AMD CPU multiplies a few rows at a third of the memory's rate), with weights in its blocks, made at load time too;
for more rows, ATen's products (forms).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gradlm.errors import cause
from gradlm.layout import cache_dir
from gradlm.model.compiling import machine_key
from gradlm.model.transformer import KVCache, ModelConfig

STEP_VERSION = 8  # part of the package's key: raise it whenever Step computes something else or compiles differently


def _product(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """(a * rows) @ w in float32: w is (in, out). int8 (scale given): w is (out, in) int8, multiplied by the
    weight-only kernel with a in bf16, the product's rows scaled instead of a's."""
    if scale is None:
        return (a if rows is None else a * rows) @ w
    out = torch._weight_int8pack_mm(a.to(torch.bfloat16), w, scale)
    return out.float() if rows is None else out * rows


MAX_ROWS = 64  # the most rows one step takes (the batch dimension is symbolic up to it)


def int8_rows() -> int:
    """The most rows the int8 step takes. Its weight-only kernel (bf16 activations) loses to the eager step's
    dynamic quantization (int8 activations, from infer.WEIGHT_ONLY_ROWS + 1 rows: there the two paths' logits differ
    by more than rounding) at many rows, by how many threads share the work (6 x 320, whole greedy decodes, compiled
    against eager int8): with 2 threads 1.36x at 8 rows and 1.13x at 16 (Sapphire Rapids Xeon), 1.52x and 1.13x (AMD
    EPYC); with one thread (a server's) 1.18x at 8 rows and 0.97x at 16 (EPYC), and 0.87x for a one-thread server's
    16 clients with every row (Xeon). So 16 rows with 2 threads or more, 4 (the eager step's own weight-only rows)
    with one."""
    return 4 if torch.get_num_threads() == 1 else 16


def tuned_rows() -> int:
    """The most rows the tuned float32 package takes (TUNED: its products chosen at a 3-row batch), more take the
    one of ATen's products: where the tuned one stops gaining (benchmarks/decode_forms.py, 6 x 320, AMD EPYC, whole
    greedy decodes, tuned / ATen's): with 2 threads 1.8x at 8 rows, 1.2x at 16, 1.0x at 24, 0.96-0.98x at 32-64; with
    one thread (a server's) 1.2x at 8, 0.94x at 16, 0.83x at 32. So 16 rows with 2 threads or more, 8 with one."""
    return 8 if torch.get_num_threads() == 1 else 16


def forms(int8: bool) -> list[tuple[str, int]]:
    """The packages a step is made of on this machine, each with the most rows it takes, fewest rows first: "int8"
    (weight-only, up to int8_rows()), or "float32" (TUNED, up to tuned_rows()) and "float32-aten" (ATen's products,
    up to MAX_ROWS)."""
    return [("int8", int8_rows())] if int8 else [("float32", tuned_rows()), ("float32-aten", MAX_ROWS)]


class Step(torch.nn.Module):
    """The step as a module whose buffers are the weights (what AOTInductor turns into loadable constants):
    forward(idx (B, 1), kv (n_layer, B, 2 * n_kv_head, max_len, head_dim), span (pos,), pad (B,)) -> (logits
    (B, 1, V), this token's keys and values (n_layer, B, 2 * n_kv_head, 1, head_dim)). Row b's first pad[b] cache
    entries are left padding (its rotary position is pos - pad[b]). span's length is the position: how many keys the
    cache holds. It comes as a size, not a value, so that the graph's attention loops over the keys there are (a
    symbolic length; over the whole window it cost 0.2 ms a token at 100 of 512, 1.4x the step): one graph for every
    batch of 1 to MAX_ROWS rows, every position from 2 to block_size - 1 and every cache length, all symbolic."""

    def __init__(self, cfg: ModelConfig, constants: dict[str, torch.Tensor], form: str):
        super().__init__()
        self.cfg, self.int8 = cfg, form == "int8"  # (the two float32 forms compute alike)
        for name, t in constants.items():
            self.register_buffer(name, t)

    def _w(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return getattr(self, name), getattr(self, name + "_scale") if self.int8 else None

    def _product(self, a: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        return _product(a, *self._w(name), rows)

    def forward(
        self, idx: torch.Tensor, kv: torch.Tensor, span: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        H, KV, D, C, B, pos = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model, idx.shape[0], span.shape[0]
        group, half, scale = H // KV, D // 2, D**-0.5

        def inv_rms(h):
            return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

        x = F.embedding(idx, self.embed).view(B, C)
        at = pos - pad  # each row's rotary position
        cos, sin = self.cos[at].view(B, 1, D), self.sin[at].view(B, 1, D)  # sin's first half negated
        real = (torch.arange(pos, device=kv.device) >= pad[:, None]).view(B, 1, 1, pos)  # keys past the padding
        new = []
        for i in range(cfg.n_layer):
            qkv = self._product(x, f"l{i}_qkv", inv_rms(x)).reshape(B, H + 2 * KV, D)
            q, k, v = qkv[:, :H], qkv[:, H : H + KV], qkv[:, H + KV :]
            if cfg.qk_norm:
                q, k = q * inv_rms(q) * getattr(self, f"l{i}_qn"), k * inv_rms(k) * getattr(self, f"l{i}_kn")
            q = q * cos + torch.cat([q[..., half:], q[..., :half]], -1) * sin
            k = k * cos + torch.cat([k[..., half:], k[..., :half]], -1) * sin
            new.append(torch.cat([k, v], 1))
            qg = q.view(B, KV, group, D)  # query head h reads key head h // group
            scores = (qg @ kv[i, :, :KV, :pos].transpose(-1, -2)) * scale  # the cached keys' (B, KV, group, pos)
            scores = scores.masked_fill(~real, float("-inf"))
            own = (qg * k.view(B, KV, 1, D)).sum(-1, keepdim=True) * scale  # the new key's score (B, KV, group, 1)
            top = torch.maximum(scores.amax(-1, keepdim=True), own)
            p, p_own = torch.exp(scores - top), torch.exp(own - top)
            y = (p @ kv[i, :, KV:, :pos] + p_own * v.view(B, KV, 1, D)) / (p.sum(-1, keepdim=True) + p_own)
            x = x + self._product(y.reshape(B, H * D), f"l{i}_o")
            gate, up = self._product(x, f"l{i}_gu", inv_rms(x)).chunk(2, 1)
            x = x + self._product(F.silu(gate) * up, f"l{i}_down")
        logits = self._product(x, "head", inv_rms(x)).reshape(B, 1, -1)
        return logits, torch.stack(new).view(cfg.n_layer, B, 2 * KV, 1, D)


def constants(model, weights: tuple, form: str) -> dict[str, torch.Tensor]:
    """The step's weights by name, from the fused path's inference_weights(model, form == "int8"): what its package
    loads (before load() puts some in inductor's blocks)."""
    layers, head_t, sin_signed = weights[0], weights[1], weights[2]
    out = {"embed": model.embed_tokens.weight.detach(), "cos": model.rope_cos, "sin": sin_signed}

    def put(name, w):
        if form == "int8":
            out[name], out[name + "_scale"] = w.q, w.scale
        else:
            out[name] = w

    for i, (qkv, o, gu, down, qn, kn) in enumerate(layers):
        for name, w in (("qkv", qkv), ("o", o), ("gu", gu), ("down", down)):
            put(f"l{i}_{name}", w)
        if qn is not None:
            out[f"l{i}_qn"], out[f"l{i}_kn"] = qn, kn
    put("head", head_t)
    return {name: t.detach().contiguous() for name, t in out.items()}


def package_path(cfg: ModelConfig, form: str) -> Path:
    """Where the package for this shape and weight form lives: $GRADLM_CACHE/aot/<key>.pt2. The key also holds what
    the compiled code depends on: torch, the CPU, and the number of threads (inductor writes it into its loops)."""
    shape = {k: getattr(cfg, k) for k in sorted(vars(cfg))}
    key = [STEP_VERSION, shape, form, *machine_key()]
    key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "aot" / f"decode-{cfg.n_layer}x{cfg.d_model}-{form}-{key}.pt2"


def layout(cfg: ModelConfig, form: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each weight constants() gives for a model of cfg in this form (the fused path's
    layouts: matrices (in, out) in float32, or int8 (out, in) with a bf16 scale per output): what a package is built
    for, and what a model's weights are checked against before the package reads them."""
    H, KV, D, C, F = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model, cfg.d_ff
    f32 = torch.float32
    out = {"embed": ((cfg.vocab_size, C), f32), "cos": ((cfg.block_size, D), f32), "sin": ((cfg.block_size, D), f32)}
    matrices = {}
    for i in range(cfg.n_layer):
        matrices |= {f"l{i}_qkv": (C, (H + 2 * KV) * D), f"l{i}_o": (H * D, C)}
        matrices |= {f"l{i}_gu": (C, 2 * F), f"l{i}_down": (F, C)}
        if cfg.qk_norm:
            out |= {f"l{i}_qn": ((D,), f32), f"l{i}_kn": ((D,), f32)}
    matrices["head"] = (C, cfg.vocab_size)
    for name, (n_in, n_out) in matrices.items():
        if form == "int8":
            out |= {name: ((n_out, n_in), torch.int8), name + "_scale": ((n_out,), torch.bfloat16)}
        else:
            out[name] = ((n_in, n_out), f32)
    return out


def example_constants(cfg: ModelConfig, form: str) -> dict[str, torch.Tensor]:
    """Random weights of layout(cfg, form): what a build needs (their values do not matter, see build)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (shape, dtype) in layout(cfg, form).items():
        if dtype == torch.int8:
            out[name] = torch.randint(-127, 128, shape, generator=g, dtype=dtype)
        else:
            out[name] = (torch.rand(shape, generator=g) + 0.5).to(dtype)
    return out


# How the float32 matrix-product step is compiled: inductor's max-autotune times each product of the step (at the
# example batch) as ATen's (MKL) and as its own C++ GEMM template, and takes the faster. The template reads its
# weights in blocks it makes while compiling (_blocks_named), which load() makes again from each model's weights.
# Greedy decodes of the 6 x 320 model against the untuned package on an AMD EPYC, 2 threads: 2.9x at batch 1,
# 4.0x at 2, 1.8x at 8, 1.2x at 16 (docs/benchmarks.md, "inductor's GEMM template").
TUNED = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
BLOCKS = "__blocks"  # the name of a weight in blocks in a package: its own name, BLOCKS and the block's outputs


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """An (in, out) matrix as inductor's C++ GEMM template reads it: outputs padded with zeros to a multiple of block,
    in blocks (out / block, in, block)."""
    n_in, n_out = w.shape
    pad = -n_out % block
    return F.pad(w, (0, pad)).reshape(n_in, (n_out + pad) // block, block).transpose(0, 1).contiguous()


def _blocks_of(w: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether data has the shape and dtype of w in blocks (_blocked) of data's last size."""
    return w.dim() == 2 and w.dtype == data.dtype and (w.shape[0], -(-w.shape[1] // data.shape[2])) == data.shape[1::-1]


@contextlib.contextmanager
def _blocks_named(weights: dict[str, torch.Tensor]):
    """While a step compiles with TUNED: each weight that inductor's GEMM template puts in blocks (a new constant of
    the package, which it would name "constantN" and the weight itself would leave the package) named after its
    weight and block size, "l0_qkv__blocks32", so that load() can make it from a model's weights. The weight is
    found by its values (the build's random weights are all different); one not found fails the tuned build. A
    private method of torch's, replaced on its class while build holds _BUILDING."""
    from torch._inductor.graph import GraphLowering

    add = GraphLowering.add_tensor_constant

    def named(self, data, name=None):
        if name is None and data.dim() == 3:
            block = data.shape[2]
            found = [key for key, w in weights.items() if _blocks_of(w, data) and torch.equal(_blocked(w, block), data)]
            if len(found) != 1:
                raise RuntimeError(f"a weight in blocks of {block} that the step cannot name ({len(found)} found)")
            name = f"{found[0]}{BLOCKS}{block}"
        return add(self, data, name)

    GraphLowering.add_tensor_constant = named
    try:
        yield
    finally:
        GraphLowering.add_tensor_constant = add


_BUILDING = threading.Lock()  # one build at a time in a process (_blocks_named changes torch's class)


def _example_rows(threads: int) -> int:
    """The rows of the batch a step is exported with. Inductor shares a loop nest among threads by its outer loops
    until their sizes (the example's) make as many chunks as threads, or twice as many or more; so the example batch
    must have fewer rows than twice the threads and not as many as the threads (else the batch alone is shared, and a
    1-row batch runs on one thread), and 2 or more (export takes sizes 0 and 1 as constants): 3, or 2 with 3 threads
    (and with one, where nothing is shared). Small, since the example's KV cache has this many rows of the window."""
    return 2 if threads in (1, 3) else 3


def build(cfg: ModelConfig, form: str, path: Path, say: Callable[[str], None] | None = None) -> None:
    """Export Step and compile it into a package at path. The weights are left out of it (they are loaded
    later), so random ones serve to build it: random in every weight, and two of inductor's habits switched off, since
    it writes a small constant's values into the code (a QK-norm's weight) and folds one whose values are all equal
    (a norm's initial ones), which the weights loaded later could not reach.

    The example batch has _example_rows: given as many rows as threads, inductor gave each thread rows of its own, so
    a 1-row batch ran on one thread (an earlier step of dot products written into the graph, at batch 1: 1.86 ms with
    a 2-row example, 1.24 with 3; 2 threads, AMD EPYC; the int8 and matrix-product steps within noise). A float32
    step is compiled TUNED (its products timed at that batch); if that fails, as before tuning."""
    with _BUILDING:
        _build(cfg, form, path, _said(say))


def _names_known(cfg: ModelConfig, form: str, package: Path) -> None:
    """Raise unless every constant of the package is a weight of layout(cfg, form), or one in blocks (_blocks_named):
    what load() can make from a model's weights."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
    known = layout(cfg, form)
    for fqn in loader.get_constant_fqns():
        name, _, block = fqn.partition(BLOCKS)
        if name not in known or (block and not block.isdigit()):
            raise RuntimeError(f"the package has a constant {fqn!r} that no weight makes")


def _build(cfg: ModelConfig, form: str, path: Path, say: Callable[[str], None]) -> None:
    module = Step(cfg, example_constants(cfg, form), form)
    n = _example_rows(torch.get_num_threads())
    kv = torch.zeros(cfg.n_layer, n, 2 * cfg.n_kv_head, cfg.block_size, cfg.head_dim)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations while it packages
        rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
        pos = torch.export.Dim("pos", min=2, max=cfg.block_size - 1)
        room = torch.export.Dim("room", min=3, max=cfg.block_size)
        example = (torch.zeros(n, 1, dtype=torch.long), kv, torch.empty(cfg.block_size // 2), torch.zeros(n).long())
        shapes = {"idx": {0: rows}, "kv": {1: rows, 3: room}, "span": {0: pos}, "pad": {0: rows}}
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
        try:
            settings = {
                "aot_inductor.package_constants_in_so": False,
                "always_keep_tensor_constants": True,
                "joint_graph_constant_folding": False,
            }
            tuned, failed = form == "float32", None
            if tuned:
                try:
                    with _blocks_named(module.state_dict()):
                        torch._inductor.aoti_compile_and_package(
                            program, package_path=str(tmp), inductor_configs=settings | TUNED
                        )
                    _names_known(cfg, form, tmp)
                except Exception as e:  # noqa: BLE001  (the products as ATen's, as before tuning)
                    tuned, failed = False, e
            if not tuned:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=settings)
            os.replace(tmp, path)
            if failed is not None:  # (one line, once the step is there without it)
                say(f"warning: tuning {what(cfg, form)} failed ({cause(failed)}); its products are ATen's")
        finally:
            tmp.unlink(missing_ok=True)


class CompiledStep:
    """The compiled decoding step of a model, its weights loaded (open_step makes one): one package, or one for few
    rows and one for the rest (forms). fits(idx, cache) says whether it can take a call; __call__(idx, cache) ->
    logits (B, 1, V), this token's keys and values written into the cache."""

    def __init__(self, model, weights: tuple, parts: list[tuple[str, Path, int]]):
        # torch's C++ loader itself: torch._inductor's Python wrapper of it costs a second of imports
        self.cfg, self.int8 = model.cfg, parts[0][0] == "int8"
        self.parts = [
            (form, rows, torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1))
            for form, path, rows in parts
        ]
        self.forms, self.max_rows = [form for form, _, _ in parts], parts[-1][2]
        self.span = torch.empty(self.cfg.block_size)  # its first pos entries: the position as a length (Step)
        self.no_pad = torch.zeros(MAX_ROWS, dtype=torch.long)
        self.load(model, weights)

    def load(self, model, weights: tuple) -> None:
        """Hand each package the model's weights in its form (kept here: a package reads them in place, so they must
        be what it was built for: a ValueError otherwise, with nothing handed over)."""
        consts = {form: constants(model, weights, form) for form, _, _ in self.parts}
        for form, given in consts.items():
            for name, want in layout(self.cfg, form).items():
                got = given.get(name)
                have = None if got is None else (tuple(got.shape), got.dtype)
                if have != want:
                    raise ValueError(f"weight {name} is {have}; the package takes {want}")
        wanted = {}  # each package's constants by name, some weights in inductor's blocks (_blocks_named)
        for form, _, loader in self.parts:
            names = [fqn.partition(BLOCKS) for fqn in loader.get_constant_fqns()]
            given = consts[form]
            wanted[form] = {n + s + b: _blocked(given[n], int(b)) if b else given[n] for n, s, b in names}
        self.consts = wanted  # (made whole before any is handed over: the packages read them in place, kept here)
        for form, _, loader in self.parts:
            # (weights, into the active buffer, check every weight is given, read in place, copy to the device)
            loader.load_constants(wanted[form], False, True, True, False)

    def forget(self) -> None:
        """(The fused path wrote a cache: this step keeps nothing of any cache between calls.)"""

    def fits(self, idx: torch.Tensor, cache: KVCache) -> bool:
        return (
            idx.shape[1] == 1
            and idx.shape[0] <= self.max_rows
            and cache.pos >= 2  # the graph's positions (a prompt of one token takes one eager step first)
            and cache.kv.dtype == torch.float32
            and cache.kv.device.type == "cpu"
        )

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        pad = self.no_pad[: idx.shape[0]] if cache.pad is None else cache.pad
        loader = next(loader for _, rows, loader in self.parts if idx.shape[0] <= rows)
        logits, new = loader.boxed_run([idx, cache.kv, self.span[: cache.pos], pad])
        cache.kv.narrow(3, cache.pos, 1).copy_(new)
        cache.pos += 1
        return logits


def _said(say: Callable[[str], None] | None) -> Callable[[str], None]:
    return say or (lambda line: print(line, file=sys.stderr, flush=True))


def _failed(say: Callable[[str], None], error: BaseException) -> None:
    say(
        f"warning: compiling the decoding step failed ({cause(error)}); decoding without it "
        "(--compile off skips the attempt)"
    )


def failed_load(error: BaseException) -> None:
    """One warning line: a step could not take a model's new weights (Forward.check decodes eagerly from then on)."""
    _said(None)(
        f"warning: the compiled decoding step could not take the new weights ({cause(error)}); decoding without it"
    )


def open_step(
    model,
    weights: tuple,
    int8: bool,
    build_missing: bool = True,
    say: Callable[[str], None] | None = None,
) -> CompiledStep | None:
    """The compiled decoding step for model with these fused-path weights (inference_weights(model, int8)): its
    packages (forms) loaded from the cache, or built first when build_missing (one line each says so, with its
    time). Not building, the packages there are enough when the one for every batch size (the last form) is: a
    float32 step without its few-row package takes those rows too (a cache from before that package existed). None
    when that one is not there and not to be built, or when building or loading failed (one warning line). It takes
    batches of up to the rows forms(int8) gives."""
    say, cfg = _said(say), model.cfg
    parts = [(form, package_path(cfg, form), rows) for form, rows in forms(int8)]
    if not build_missing:
        if not parts[-1][1].exists():
            return None
        parts = [part for part in parts if part[1].exists()]
    try:
        for form, path, _ in parts:
            if not path.exists():
                start = time.perf_counter()
                build(cfg, form, path, say)
                seconds = time.perf_counter() - start
                say(f"compiling {what(cfg, form)}: {seconds:.1f} s (cached in {path.parent} for next time)")
        return CompiledStep(model, weights, parts)
    except Exception as e:  # noqa: BLE001  (any failure to build or load: decode as written)
        _failed(say, e)
        return None


def what(cfg: ModelConfig, form: str) -> str:
    return f"the decoding step ({cfg.n_layer} x {cfg.d_model}, {form})"


def build_in_background(cfg: ModelConfig, int8: bool, say: Callable[[str], None] | None = None):
    """Start building the packages for this shape in another process (decoding goes on meanwhile; open_step finds
    them once they are there). The process, or None when they are already there."""
    missing = [form for form, _ in forms(int8) if not package_path(cfg, form).exists()]
    if not missing:
        return None
    where = package_path(cfg, missing[0]).parent
    for form in missing:
        _said(say)(f"compiling {what(cfg, form)} in the background, 10-40 s (cached in {where} for next time)")
    spec = json.dumps({k: getattr(cfg, k) for k in vars(cfg)})
    threads = str(torch.get_num_threads())  # built for this process's threads
    return subprocess.Popen([sys.executable, "-m", "gradlm.model.aot", spec, threads, *missing])


if __name__ == "__main__":  # python -m gradlm.model.aot CONFIG_JSON THREADS FORM...: build_in_background's
    cfg = ModelConfig(**json.loads(sys.argv[1]))
    torch.set_num_threads(int(sys.argv[2]))
    for kind in sys.argv[3:]:
        start = time.perf_counter()
        try:
            build(cfg, kind, package_path(cfg, kind))
        except Exception as e:  # noqa: BLE001
            _failed(_said(None), e)
            sys.exit(1)
        seconds = time.perf_counter() - start
        then = " (used from the next request)" if kind == sys.argv[-1] else ""
        _said(None)(f"compiled {what(cfg, kind)} in the background: {seconds:.1f} s{then}")
