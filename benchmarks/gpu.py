"""The GPU benchmark: one command, one table, everything issue 21 asks a GPU to show, in at most 8 minutes.

Sections (each guarded: a failure prints its error as a row of the table and the next section runs; each runs
under a time limit, and all of them together under --budget):
  train     training tokens/s and MFU at a GPT-2-small shape (12 layers x 768, context 1024, vocab 50304, tied
            embeddings: 124M parameters, nanoGPT bench.py's model) under the training dtype (bf16 on a GPU),
            real steps (forward, backward, AdamW), eager and torch.compile'd. MFU is against this device's own
            measured matmul rate in that dtype (a large square matmul timed with synchronisation), not a data
            sheet. With --nanogpt PATH (a checkout outside this repository) nanoGPT's bench.py runs as a
            subprocess at the same batch and context, eager and compiled, and its figures are parsed.
  generate  generation tokens/s of gradlm's engine against transformers' generate() on the same weights, at
            batch 1, 8 and 32, greedy: in the inference dtype (bf16 on a GPU: the share of tokens identical)
            and in float32 (strict: TF32 off; tokens should be identical).
  serve     benchmarks/serve.py (a subprocess, small counts): 16 concurrent clients against one at a time.
  tests     pytest tests/test_cuda.py (a subprocess): passed / failed / skipped.
  quality   with --nanogpt: nanoGPT's config/train_shakespeare_char.py recipe (--quality-iters iterations;
            the full recipe is 5000) against `gradlm train --max-time T` with no model flags, T = nanoGPT's wall
            time, bits per character on the held-out last 10% (benchmarks/quality.py's functions).

    python benchmarks/gpu.py --nanogpt ~/nanoGPT --out gpu.json            # on the GPU: ~8 minutes
    python benchmarks/gpu.py --device cpu --small                          # a rehearsal on a CPU: ~1 minute (~3 with
    --nanogpt)
    python benchmarks/gpu.py --sections train,generate                     # some sections only

Nothing is downloaded: nanoGPT comes from --nanogpt (a checkout or a bare git directory), transformers and
torch from the environment, the quality corpus from --corpus or the data mirror.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/generate.py, benchmarks/quality.py

from gradlm import runtime as runtime_module  # noqa: E402
from gradlm.model.transformer import Transformer, ModelConfig, flops_per_token  # noqa: E402
from machine import cpu_name  # noqa: E402

SECTIONS = ("train", "generate", "serve", "tests", "quality")
# The most seconds each section may take (estimates for an H100, not yet measured: train ~140 s, of which ~100 s are
# the two compilations, ours and nanoGPT's; generate ~45 s; serve ~30 s; tests ~125 s, a compilation among them;
# quality ~2 T + 30 s with T ~55 s at 600 iterations). The run stops starting sections once --budget is spent, and
# a section never runs past what is left of it, so the whole stays within --budget (+ a few seconds).
LIMITS = {"train": 170, "generate": 75, "serve": 50, "tests": 150, "quality": 240}
NANOGPT_A100_PEAK = 312e12  # the bf16 peak nanoGPT's estimate_mfu divides by (an A100's data sheet)

SMALL = dict(  # --small: a rehearsal on a 2-core CPU in ~3 minutes
    n_layer=2,
    d_model=128,
    context=64,
    batch=1,
    steps=10,
    matmul_size=1024,
    gen_batches="1,8,32",
    new_tokens=32,
    gen_repeats=3,
    serve_model="tiny",
    serve_requests=64,
    serve_sequential=8,
    serve_rounds=2,
    serve_max_tokens=16,
    quality_iters=300,
    quality_chars=300_000,
    budget=330,
)


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float, what: str = "this section"):
    """Raise SectionTimeout in this (main) thread after `seconds` (subprocess.run kills its child on it). Nested
    limits work: the inner one never outlasts the outer, which is re-armed with what it has left."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    seconds = max(min(seconds, outer) if outer else seconds, 1.0)

    def fire(signum, frame):
        raise SectionTimeout(f"{what} went over its {seconds:.0f}s time limit")

    old = signal.signal(signal.SIGALRM, fire)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 0.01))


class Report:
    """The rows of the one table: section, what was measured, gradlm's figure, the reference's, their ratio, notes."""

    def __init__(self):
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}

    def add(
        self, section: str, what: str, gradlm: str = "", reference: str = "", ratio: str = "", note: str = "", **data
    ) -> None:
        row = {
            "section": section,
            "what": what,
            "gradlm": gradlm,
            "reference": reference,
            "ratio": ratio,
            "note": note,
            "data": data,
        }
        self.rows.append(row)
        print(f"  [{section}] {what}: {gradlm} | {reference} | {ratio} | {note}", file=sys.stderr, flush=True)

    def table(self) -> str:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = [
            "| section | measure | gradlm | reference | gradlm / reference | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['section']} | {cell(r['what'])} | {cell(r['gradlm'])} | {cell(r['reference'])} | "
            f"{cell(r['ratio'])} | {cell(r['note'])} |"
            for r in self.rows
        ]
        return "\n".join(lines)


def run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own: on a timeout (or this section's time limit) the command and
    every process it started (a server, a test's training run, compile workers) are killed together."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def fmt(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


# ---- the machine -------------------------------------------------------------------------------------------


def machine(rt) -> dict:
    info = {
        "device": rt.device,
        "train_dtype": rt.dtype,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "gpu": None,
        "driver": None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if rt.kind == "cuda":
        p = torch.cuda.get_device_properties(rt.device)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            info["driver"] = smi.stdout.strip().splitlines()[0].split(",")[-1].strip()
            info["gpu"] = info["gpu"] or smi.stdout.strip().splitlines()[0].split(",")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["gradlm_commit"] = head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["gradlm_commit"] = None
    return info


def matmul_rate(rt, n: int, iters: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in the training dtype on this device: warmed up, timed with synchronisation."""
    dtype = rt.torch_dtype
    a = torch.randn(n, n, device=rt.device, dtype=dtype)
    b = torch.randn(n, n, device=rt.device, dtype=dtype)
    for _ in range(3):
        a @ b
    rt.synchronize()
    best = 0.0
    for _ in range(3):  # the best of three rounds: a shared machine's noise only ever slows a round down
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        rt.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


# ---- sections ----------------------------------------------------------------------------------------------


class Context:
    """What every section reads: the flags, the runtime, the machine, the measured matmul peak."""

    def __init__(self, args, rt, info):
        self.args, self.rt, self.info = args, rt, info
        self.peak: float | None = None
        self.env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
        if rt.kind == "cpu":  # subprocesses (gradlm train / serve, nanoGPT, pytest) must not pick a GPU either
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def model_config(self, block_size: int | None = None) -> ModelConfig:
        a = self.args
        heads = a.n_head or max(1, a.d_model // 64)
        # tied embeddings: GPT-2's (and nanoGPT's), 124M parameters at 12 x 768 with vocab 50304
        return ModelConfig(
            vocab_size=a.vocab,
            block_size=block_size or a.context,
            n_layer=a.n_layer,
            n_head=heads,
            d_model=a.d_model,
            tie_embeddings=True,
        )

    def gpt2_shape(self) -> bool:
        a = self.args
        return (a.n_layer, a.d_model, a.vocab) == (12, 768, 50304) and (a.n_head or a.d_model // 64) == 12


def build_optimizer(model, rt) -> tuple[torch.optim.Optimizer, str]:
    """gradlm's AdamW (decay on matrices only); fused on CUDA, set here if gradlm's builder does not."""
    import inspect

    from gradlm.training.optim import build_optimizer as gradlm_optimizer

    fused = {"fused": True} if rt.kind == "cuda" and "fused" in inspect.signature(gradlm_optimizer).parameters else {}
    opt = gradlm_optimizer(model, "adamw", 6e-4, 0.1, 0.9, (0.9, 0.95), **fused)
    if rt.kind == "cuda" and not opt.defaults.get("fused"):
        groups = [{k: v for k, v in g.items() if k != "fused"} for g in opt.param_groups]
        return torch.optim.AdamW(
            groups, lr=6e-4, betas=(0.9, 0.95), fused=True
        ), "gradlm's AdamW groups, fused=True set by this benchmark (build_optimizer does not fuse)"
    return opt, "gradlm.training.optim.build_optimizer AdamW" + (", fused" if opt.defaults.get("fused") else "")


def time_training(ctx: Context, compiled: bool) -> dict:
    """Real training steps (forward, backward, AdamW) on random tokens already on the device."""
    a, rt = ctx.args, ctx.rt
    cfg = ctx.model_config()
    torch.manual_seed(0)
    model = Transformer(cfg).to(rt.device)
    opt, opt_note = build_optimizer(model, rt)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.context), device=rt.device)
    y = torch.randint(0, cfg.vocab_size, (a.batch, a.context), device=rt.device)
    fwd = torch.compile(model) if compiled else model

    def step():
        with rt.autocast():
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    rt.synchronize()
    first = time.perf_counter() - t0  # compiled: the compilation (forward and backward graphs) and one step
    step()
    rt.synchronize()
    t0 = time.perf_counter()
    step()
    rt.synchronize()
    one = time.perf_counter() - t0
    steps = max(3, min(a.steps, int(a.step_seconds / max(one, 1e-6))))  # at most ~step_seconds of timed steps
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()  # no host read per step (gradlm's trainer reads at log steps): the device stays busy
    rt.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = a.batch * a.context / dt
    out = {
        "tokens_per_s": tokens,
        "ms_per_step": dt * 1e3,
        "steps": steps,
        "first_step_s": first,
        "loss": loss.item(),
        "params": model.num_params(),
        "flops_per_token": flops_per_token(cfg),
        "optimizer": opt_note,
    }
    out["mfu"] = tokens * out["flops_per_token"] / ctx.peak if ctx.peak else float("nan")
    return out  # the model, optimizer and compiled graphs go with this frame; the caller frees the device memory


def nanogpt_tree(path: Path, work: Path) -> Path:
    """A folder holding nanoGPT's files: the checkout itself, or an extraction of a (bare) git directory."""
    if (path / "bench.py").is_file():
        return path
    tree = work / "nanogpt-tree"
    if not tree.is_dir():
        tree.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "--git-dir", str(path), "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if not (tree / "bench.py").is_file():
        raise FileNotFoundError(f"{path} holds no nanoGPT bench.py (give a checkout or its git directory)")
    return tree


def nanogpt_git_dir(path: Path) -> Path:
    """benchmarks/quality.py's run_reference takes a git directory: a checkout's .git, or a bare one."""
    return path / ".git" if (path / ".git").exists() else path


def run_nanogpt_bench(ctx: Context, tree: Path, compiled: bool, timeout: float) -> dict:
    """nanoGPT's bench.py at our batch and context on random tokens (real_data=False), parsed."""
    a, rt = ctx.args, ctx.rt
    flags = [
        f"--batch_size={a.batch}",
        f"--block_size={a.context}",
        "--real_data=False",
        f"--device={rt.device}",
        f"--compile={compiled}",
    ]
    if rt.kind == "cuda":
        flags.append(f"--dtype={'bfloat16' if rt.dtype == 'bfloat16' else 'float32'}")
        cmd = [sys.executable, "bench.py", *flags]
    else:
        # bench.py calls torch.cuda.synchronize() unconditionally, which a CPU build of torch refuses; on a CPU
        # there is nothing to wait for, so the rehearsal replaces it with a no-op and runs the script unchanged.
        shim = (
            "import runpy, sys, torch; torch.cuda.synchronize = lambda *a, **k: None; "
            "sys.argv = ['bench.py', *sys.argv[1:]]; runpy.run_path('bench.py', run_name='__main__')"
        )
        cmd = [sys.executable, "-c", shim, *flags]
    t0 = time.perf_counter()
    r = run_group(cmd, timeout, cwd=tree, env=ctx.env)
    wall = time.perf_counter() - t0
    m = re.search(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(
            f"nanoGPT bench.py failed (exit {r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}"
        )
    ms, mfu_a100 = float(m.group(1)), float(m.group(2)) / 100
    n = re.search(r"number of parameters: ([\d.]+)M", r.stdout)
    if n:  # its own FLOP count (estimate_mfu: 6N + 12 L H Q T per token, N without position embeddings), unrounded
        achieved = (6 * float(n.group(1)) * 1e6 + 12 * 12 * 12 * 64 * a.context) * a.batch * a.context / (ms / 1e3)
    else:  # from its MFU, printed to 0.01% of an A100's peak
        achieved = mfu_a100 * NANOGPT_A100_PEAK
    return {
        "tokens_per_s": a.batch * a.context / (ms / 1e3),
        "ms_per_step": ms,
        "mfu": achieved / ctx.peak if ctx.peak else float("nan"),
        "its_mfu_vs_a100": mfu_a100,
        "wall_s": wall,
        "fused": "using fused AdamW: True" in r.stdout,
    }


def section_train(ctx: Context, rep: Report) -> None:
    a, rt = ctx.args, ctx.rt
    ctx.peak = ctx.peak or matmul_rate(rt, a.matmul_size)
    cfg = ctx.model_config()
    shape = f"{cfg.n_layer} x {cfg.d_model}, context {a.context}, batch {a.batch}, vocab {cfg.vocab_size}, {rt.dtype}"
    rep.add(
        "train",
        f"{rt.dtype} matmul peak, measured ({a.matmul_size}^3, synchronised)",
        f"{ctx.peak / 1e12:.2f} TFLOP/s",
        note="the denominator of every MFU below",
        peak_flops=ctx.peak,
    )
    nano = None
    nano_note = "no --nanogpt: nanoGPT's bench.py column skipped"
    if a.nanogpt:
        nano = nanogpt_tree(Path(a.nanogpt).expanduser(), ctx.work)
        nano_note = "nanoGPT: bench.py, random tokens" + (
            "" if rt.kind == "cuda" else ", float32 (it autocasts only on CUDA)"
        )
        if not ctx.gpt2_shape():
            nano_note += f", at its fixed 12 x 768 (ours: {cfg.n_layer} x {cfg.d_model}): no ratio"
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        try:
            ours = time_training(ctx, compiled)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the other mode (and nanoGPT) still run
            traceback.print_exc()
            rep.add("train", f"tokens/s, {mode}", "error", note=one_line(e))
            ours = None
        finally:
            if compiled:
                torch._dynamo.reset()
            free(rt)  # before nanoGPT's process needs the GPU's memory
        ref, ref_cell, ratio = None, "", ""
        if nano is not None:
            if rt.kind != "cuda" and compiled:
                ref_cell = "not run: compiling nanoGPT's 124M model on a CPU takes too long for a rehearsal"
            else:
                try:
                    ref = run_nanogpt_bench(ctx, nano, compiled, timeout=max(30.0, ctx.left() - 5))
                    ref_cell = (
                        f"{fmt(ref['tokens_per_s'])} tok/s, MFU {ref['mfu']:.1%} ({ref['ms_per_step']:.1f} ms/step)"
                    )
                except SectionTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    ref_cell = f"error: {one_line(e)}"
        if ours is not None:
            if ref is not None and ctx.gpt2_shape():
                ratio = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            compile_note = f"; first step {ours['first_step_s']:.1f} s (the compilation)" if compiled else ""
            rep.add(
                "train",
                f"tokens/s (MFU), {mode}, {shape}",
                f"{fmt(ours['tokens_per_s'])} tok/s, MFU {ours['mfu']:.1%}",
                ref_cell or nano_note,
                ratio,
                f"{ours['params'] / 1e6:.0f}M parameters, {ours['ms_per_step']:.1f} ms/step over {ours['steps']} "
                f"steps{compile_note}; {ours['optimizer']}"
                + (f"; {nano_note}" if ref_cell and nano is not None else "")
                + (
                    f" (its own MFU figure, against an A100's 312 TFLOP/s: {ref['its_mfu_vs_a100']:.1%}; fused AdamW: "
                    f"{ref['fused']})"
                    if ref and rt.kind == "cuda"
                    else ""
                ),
                ours=ours,
                nanogpt=ref,
            )
        elif ref is not None:
            rep.add("train", f"nanoGPT bench.py, {mode}", "", ref_cell, note=nano_note, nanogpt=ref)


def hf_generate(hf, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    """transformers' generate(), greedy, left-padded prompts, exactly n new tokens (benchmarks/generate.py's
    theirs(), on a device)."""
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, P:].tolist()


@contextmanager
def strict_float32(device: str):
    """float32 products without TF32 (the runtime turns TF32 on for CUDA training): the identical-tokens check."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def section_generate(ctx: Context, rep: Report) -> None:
    import generate as gen_bench  # benchmarks/generate.py: hf_model, ByteTokens, ours

    from gradlm.generation.engine import Engine

    a, rt = ctx.args, ctx.rt
    warnings.filterwarnings("ignore")
    infer = runtime_module.resolve(rt.device, "auto", "off", inference=True)
    n = a.new_tokens
    cfg = ctx.model_config(block_size=max(a.context, 64 + n))
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    model.eval()
    hf32 = gen_bench.hf_model(model)
    tok = gen_bench.ByteTokens(cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    batches = [int(b) for b in a.gen_batches.split(",")]
    prompts_for = {
        B: [
            torch.randint(0, cfg.vocab_size, (L,), generator=gen).tolist()
            for L in ([32] if B == 1 else [16 + (48 * b) // (B - 1) for b in range(B)])
        ]
        for B in batches
    }
    variants = [(infer.dtype, False)] + ([("float32", False)] if infer.dtype != "float32" else [])
    # the engine with its one-token step recorded as CUDA graphs (what `--compile on` decodes with on CUDA)
    if a.gen_compile:
        import inspect

        if rt.kind != "cuda":  # (on the CPU the engine would decode eagerly: the rows above again)
            rep.add("generate", "decode step in CUDA graphs", note=f"skipped: no CUDA device ({rt.device})")
        elif "runtime" in inspect.signature(Engine).parameters:
            variants.append((infer.dtype, True))
        else:
            rep.add(
                "generate",
                "decode step in CUDA graphs",
                note="skipped: gradlm.generation.engine.Engine takes no runtime here",
            )
    what = f"{cfg.n_layer} x {cfg.d_model}, vocab {cfg.vocab_size}, greedy, {n} new tokens"
    for dtype, compiled in variants:
        try:
            tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
            ours_model = copy.deepcopy(model).to(rt.device, tdtype)
            hf = copy.deepcopy(hf32).to(rt.device, tdtype)
            engine = (
                Engine(ours_model, tok, runtime=runtime_module.Runtime(rt.device, dtype, False, "graphs"))
                if compiled
                else Engine(ours_model, tok)
            )
            label = dtype + (", step in CUDA graphs" if compiled else "")
            strict = dtype == "float32" and rt.kind == "cuda"
            for B in batches:
                prompts = prompts_for[B]
                with strict_float32(rt.device) if strict else nullcontext():
                    a_out, b_out = gen_bench.ours(engine, prompts, n), hf_generate(hf, prompts, n, rt.device)  # warm-up
                    t_ours, t_hf = [], []
                    for _ in range(a.gen_repeats):  # alternate, so both see the same machine
                        t0 = time.perf_counter()
                        a_out = gen_bench.ours(engine, prompts, n)
                        t_ours.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        b_out = hf_generate(hf, prompts, n, rt.device)
                        t_hf.append(time.perf_counter() - t0)
                rows_same = sum(x == y for x, y in zip(a_out, b_out))
                tokens_same = sum(u == v for x, y in zip(a_out, b_out) for u, v in zip(x, y)) / (B * n)
                ours_tps, hf_tps = B * n / statistics.median(t_ours), B * n / statistics.median(t_hf)
                if dtype == "float32":
                    same = (
                        f"tokens: {rows_same}/{B} rows identical"
                        + ("" if rows_same == B else f" ({tokens_same:.1%} of tokens)")
                        + ("; strict float32 (TF32 off)" if strict else "")
                    )
                else:
                    same = f"{tokens_same:.1%} of tokens identical ({rows_same}/{B} rows)"
                rep.add(
                    "generate",
                    f"tokens/s, batch {B}, {label}, {what}",
                    fmt(ours_tps),
                    f"transformers {fmt(hf_tps)}",
                    f"{ours_tps / hf_tps:.2f}x",
                    same + f"; median of {a.gen_repeats} after a warm-up",
                    batch=B,
                    dtype=dtype,
                    ours_tps=ours_tps,
                    hf_tps=hf_tps,
                    rows_same=rows_same,
                    tokens_same=tokens_same,
                )
            del ours_model, hf, engine
            free(rt)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the other variants still run
            traceback.print_exc()
            rep.add("generate", f"{dtype}{', step in CUDA graphs' if compiled else ''}", "error", note=one_line(e))
            free(rt)


def section_serve(ctx: Context, rep: Report) -> None:
    a, rt = ctx.args, ctx.rt
    script = HERE / "serve.py"
    cmd = [
        sys.executable,
        str(script),
        "--model",
        a.serve_model,
        "--clients",
        "16",
        "--requests",
        str(a.serve_requests),
        "--sequential",
        str(a.serve_sequential),
        "--rounds",
        str(a.serve_rounds),
        "--max-tokens",
        str(a.serve_max_tokens),
        "--device",
        rt.device,
    ]
    device_note = f"--device {rt.device}"
    r = run_group(cmd, max(10.0, ctx.left() - 2), cwd=ROOT, env=ctx.env)
    rows = {
        int(m.group(1)): m
        for m in re.finditer(
            r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \| ([\d,]+) \| (\d+) \| (\d+) \| (\d+)", r.stdout, re.M
        )
    }
    ratio = re.search(r"one client at a time: ([\d.]+)x overall", r.stdout)
    if 1 not in rows or 16 not in rows or not ratio:
        raise RuntimeError(
            f"benchmarks/serve.py exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}"
        )
    # what was served, on what runtime
    banner = r.stdout.splitlines()[0].split(" at http")[0] if r.stdout.startswith("serving") else ""
    one, many = rows[1], rows[16]
    errors = int(one.group(8)) + int(many.group(8))
    rep.add(
        "serve",
        f"aggregate tokens/s, 16 concurrent clients vs one at a time ({a.serve_model} random model, "
        f"{a.serve_max_tokens} new tokens a request)",
        f"16 clients: {many.group(5)} tok/s (p50 {many.group(6)} ms)",
        f"1 client: {one.group(5)} tok/s (p50 {one.group(6)} ms)",
        f"{float(ratio.group(1)):.2f}x",
        f"{device_note}; {many.group(2)} + {one.group(2)} requests; {errors} errors; {banner}",
        stdout=r.stdout,
    )


def section_tests(ctx: Context, rep: Report) -> None:
    # pyproject's addopts adds -q
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "tests/test_cuda.py"]
    t0 = time.perf_counter()
    r = run_group(cmd, max(10.0, ctx.left() - 2), cwd=ROOT, env=ctx.env)
    wall = time.perf_counter() - t0
    last = next(
        (ln for ln in reversed(r.stdout.strip().splitlines()) if re.search(r"\d+ (passed|failed|skipped|errors?)", ln)),
        "",
    )
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for num, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last):
        counts["error" if kind.startswith("error") else kind] += int(num)
    failed = [
        ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))
    ]
    skipped = next((ln.split(": ", 1)[-1] for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")), "")
    if not last:
        raise RuntimeError(f"pytest exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}")
    note = (
        f"{wall:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; skipped because {skipped}" if counts["skipped"] and skipped else "")
    )
    rep.add(
        "tests",
        "pytest tests/test_cuda.py",
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped",
        note=note,
        counts=counts,
        failed=failed,
        tail=r.stdout[-4000:],
    )


def quality_corpus(a) -> str:
    import quality

    path = a.corpus
    if not path and not os.environ.get("GRADLM_DATA_MIRROR"):
        for d in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
            if (d / "tinyshakespeare.txt").is_file():
                path = str(d / "tinyshakespeare.txt")
                break
    text = quality.corpus_text(path)
    return text[: a.quality_chars] if a.quality_chars else text


def section_quality(ctx: Context, rep: Report) -> None:
    import quality  # benchmarks/quality.py: corpus_text, run_reference, run_ours

    a, rt = ctx.args, ctx.rt
    if not a.nanogpt:
        rep.add(
            "quality",
            "held-out bits/char at nanoGPT's wall time",
            note="skipped: no --nanogpt (a nanoGPT checkout outside this repository)",
        )
        return
    it = a.quality_iters
    # the recipe as its config file has it, on this GPU (compiled, bf16 where supported), fewer iterations
    if rt.kind == "cuda":
        recipe = [f"--device={rt.device}", f"--max_iters={it}", f"--lr_decay_iters={it}"]
    else:  # benchmarks/quality.py's CPU recipe (4 x 128), fewer iterations
        recipe = [r for r in quality.RECIPE if not r.startswith(("--max_iters", "--lr_decay_iters"))] + [
            f"--max_iters={it}",
            f"--lr_decay_iters={it}",
        ]
    # an evaluation at the last iteration, which is the score
    recipe.append(f"--eval_interval={250 if it % 250 == 0 else it}")
    if it < 500:
        # its 100 warm-up iterations would leave no decay (a division by zero at 100)
        recipe.append(f"--warmup_iters={it // 10}")
    text = quality_corpus(a)
    cut = int(len(text) * 0.9)
    work = ctx.work / "quality"
    work.mkdir()
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "val.txt").write_text(text[cut:], encoding="utf-8")
    saved, env = quality.RECIPE, dict(os.environ)
    quality.RECIPE = recipe  # run_reference passes quality.RECIPE to nanoGPT's train.py
    os.environ.clear()
    os.environ.update(ctx.env)  # run_reference and run_ours start their subprocesses with this process's environment
    try:
        # ours then trains for as long as nanoGPT did and adds its data preparation and evaluation (~30 s)
        with time_limit(
            (ctx.left() - 30) / 2,
            f"nanoGPT's recipe at {it} iterations (lower --quality-iters, or run --sections quality alone)",
        ):
            T, ref_bpc = quality.run_reference(nanogpt_git_dir(Path(a.nanogpt).expanduser()), text, work)
        o = quality.run_ours(work / "train.txt", work / "val.txt", T, work / "ours")
    finally:
        quality.RECIPE = saved
        os.environ.clear()
        os.environ.update(env)
    m = o["model"]
    rep.add(
        "quality",
        f"held-out bits/char (last 10% of {len(text):,} chars), budget T = nanoGPT's wall time {T:.0f} s",
        f"{o['bpc']:.3f}",
        f"nanoGPT {ref_bpc:.3f}",
        f"{o['bpc'] - ref_bpc:+.3f} bits",
        f"nanoGPT: config/train_shakespeare_char.py, {it} iterations (the recipe: 5000), {' '.join(recipe)}; its last "
        "validation loss. "
        f"gradlm: train --max-time {T:.0f}s, no model flags: {m['n_layer']} x {m['d_model']}, context "
        f"{m['block_size']}, vocab {m['vocab_size']}, {o['dtype']}, "
        f"{fmt(o['tokens_per_s'])} tok/s; eval --data on the held-out text (the inference dtype auto picks)",
        T=T,
        ref_bpc=ref_bpc,
        ours=o,
    )


def free(rt) -> None:
    gc.collect()
    if rt.kind == "cuda":
        torch.cuda.empty_cache()


RUNNERS = {
    "train": section_train,
    "generate": section_generate,
    "serve": section_serve,
    "tests": section_tests,
    "quality": section_quality,
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help=runtime_module.DEVICE_HELP)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=runtime_module.DTYPES,
        help="training's compute dtype (auto: bf16 where the device multiplies it natively); generation uses the "
        "inference dtype auto picks, and float32",
    )
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    ap.add_argument(
        "--nanogpt",
        default="",
        help="a nanoGPT checkout (or its git directory) outside this repository: bench.py and the quality reference",
    )
    ap.add_argument("--out", default="", help="also write the table and the machine as JSON here")
    ap.add_argument(
        "--small", action="store_true", help="rehearsal sizes for a CPU (each flag below still wins when typed)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in this process (0 = torch's default); on a small shared CPU 1 is steadier",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds for the whole run: no section starts once they are spent (default 480 = 8 minutes)",
    )
    g = ap.add_argument_group("sizes")
    g.add_argument("--n-layer", type=int, default=12)
    g.add_argument("--d-model", type=int, default=768)
    g.add_argument("--n-head", type=int, default=0, help="0 = d_model / 64")
    g.add_argument("--vocab", type=int, default=50304)
    g.add_argument("--context", type=int, default=1024, help="training context (and nanoGPT bench.py's block_size)")
    g.add_argument("--batch", type=int, default=12, help="training batch (nanoGPT bench.py's default: 12)")
    g.add_argument("--steps", type=int, default=20, help="most timed training steps")
    g.add_argument(
        "--step-seconds",
        type=float,
        default=10,
        help="at most about this many seconds of timed training steps per mode",
    )
    g.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n matmul that measures the peak")
    g.add_argument("--gen-batches", default="1,8,32")
    g.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    g.add_argument("--gen-repeats", type=int, default=2, help="timed generation runs of each implementation (median)")
    g.add_argument(
        "--gen-compile",
        action="store_true",
        help="also time the engine with its one-token step recorded as CUDA graphs (--compile on's decoding on CUDA)",
    )
    g.add_argument("--serve-model", default="demo", choices=("tiny", "demo"), help="benchmarks/serve.py --model")
    g.add_argument(
        "--serve-requests", type=int, default=320, help="benchmarks/serve.py --requests (shared by the 16 clients)"
    )
    g.add_argument("--serve-sequential", type=int, default=20, help="benchmarks/serve.py --sequential")
    g.add_argument("--serve-rounds", type=int, default=2, help="benchmarks/serve.py --rounds")
    g.add_argument("--serve-max-tokens", type=int, default=32, help="benchmarks/serve.py --max-tokens")
    g.add_argument(
        "--quality-iters",
        type=int,
        default=600,
        help="nanoGPT's iterations for the quality reference (its recipe: 5000, ~3 minutes on an A100; then ours for "
        "as long)",
    )
    g.add_argument(
        "--quality-chars", type=int, default=0, help="use only the first N characters of the corpus (0 = all)"
    )
    g.add_argument(
        "--corpus",
        default="",
        help="quality corpus: a UTF-8 text file (default: the shakespeare dataset, from the data mirror)",
    )
    first, _ = ap.parse_known_args(argv)
    if first.small:
        ap.set_defaults(**SMALL)
    args = ap.parse_args(argv)
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        rt = runtime_module.resolve(args.device, args.dtype, "off")
    except Exception as e:  # noqa: BLE001 - a ConfigError: one line, exit 2, as every gradlm command
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime_module.set_fast_matmul(rt.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(rt)
    print(
        f"device: {rt.device} ({info['gpu'] or 'no GPU'}); driver {info['driver'] or 'n/a (no nvidia-smi)'}; torch "
        f"{info['torch']} (CUDA {info['cuda_runtime']}); "
        f"transformers {info['transformers']}; Python {info['python']}"
    )
    print(
        f"CPU: {info['cpu']} ({torch.get_num_threads()} torch threads); training dtype {rt.dtype}; gradlm "
        f"{info['gradlm_commit']}" + ("; --small (a rehearsal: not GPU figures)" if args.small else "")
    )
    rep = Report()
    with tempfile.TemporaryDirectory(prefix="gradlm-gpu-") as tmp:
        ctx = Context(args, rt, info)
        ctx.work = Path(tmp)
        for name in args.sections.split(","):
            left = args.budget - (time.monotonic() - start)
            if left < 10:
                rep.add(name, "skipped", note=f"the --budget of {args.budget:.0f} s was spent before this section")
                rep.sections[name] = {"status": "skipped", "seconds": 0.0}
                continue
            # a section run alone may take the whole budget (e.g. --sections quality --quality-iters 5000 --budget 600)
            limit = (
                left if len(args.sections.split(",")) == 1 else min(LIMITS[name] * (1 if not args.small else 2), left)
            )
            t0 = time.monotonic()
            ctx.left = lambda t0=t0, limit=limit: limit - (time.monotonic() - t0)  # noqa: E731
            print(f"[{name}] up to {limit:.0f} s", file=sys.stderr, flush=True)
            status = "ok"
            try:
                with time_limit(limit, f"the {name} section"):
                    RUNNERS[name](ctx, rep)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one section's failure is a row, and the run goes on
                traceback.print_exc()
                rep.add(
                    name,
                    "error",
                    note=one_line(e) if not isinstance(e, SystemExit) else f"exited: {str(e.code)[-300:]}",
                )
                status = "error"
            free(rt)
            rep.sections[name] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
    wall = time.monotonic() - start
    print()
    print(rep.table())
    print(
        f"\nwall time {wall:.0f} s; per section: "
        + ", ".join(f"{k} {v['seconds']:.0f} s ({v['status']})" for k, v in rep.sections.items())
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args),
                    "wall_s": round(wall, 1),
                    "sections": rep.sections,
                    "rows": rep.rows,
                    "table": rep.table(),
                },
                indent=2,
                default=str,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
