"""gradlm's own decoding against llama.cpp on the same weights: f32, f16 and q8_0 GGUF exports, batch 1, 8 and 16.

Takes a run (--run; by default trains one: 6 layers x 320 on Shakespeare for 200 steps), exports it with
`gradlm export --format gguf` in each type, and decodes greedily, side by side in one process, alternating:
gradlm (its engine with a KV cache, float32 and `--dtype int8`, each also with the compiled decoding step,
gradlm/model/aot.py, built first in a fresh cache: its build and open times are printed) and llama.cpp through
llama-cpp-python's
low-level API (one context, a batch of N sequences, greedy argmax in numpy, so both pay a Python loop per step).
Prompts are Shakespeare lines of different lengths; every row decodes --new-tokens tokens, no early stop.
Tokens/s counts new tokens over the whole call, prefill included; each
figure is the median of --repeats runs after a warm-up.
Agreement: the share of positions where llama.cpp's greedy token equals gradlm's, row by row up to the first
difference ("exact" when every row matches), and the teacher-forced argmax agreement over gradlm's tokens.

    python benchmarks/llamacpp.py                         # the table in docs/benchmarks.md
    python benchmarks/llamacpp.py --run runs/shakes --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradlm.generation.engine import Engine, Request
from gradlm.model.infer import Forward, Int8
from gradlm.model.sampling import SamplingConfig
from gradlm.formats.gguf import export_gguf
from gradlm.rundir import load_model
from gradlm.runtime import Runtime
from machine import cpu_flags, cpu_name


def gradlm_decode(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding of every prompt together through gradlm's engine."""
    engine.max_batch = len(prompts)
    cfg = SamplingConfig(temperature=0, max_new_tokens=n)
    return [[p.token.id for p in pieces] for pieces in engine.run([Request(ids, cfg) for ids in prompts])]


class LlamaCpp:
    """One llama.cpp model and context holding up to `rows` sequences, decoded greedily in one batch."""

    def __init__(self, path: Path, rows: int, n_ctx: int, threads: int, repack: bool = True):
        import llama_cpp as L
        from llama_cpp._logger import set_verbose

        self.L = L
        set_verbose(False)  # llama.cpp's load log goes through llama-cpp-python's logger: errors only
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.use_extra_bufts = repack  # llama.cpp's weight repacking for its AMX / AVX kernels
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx * rows, n_ctx * rows, n_ctx * rows, rows
        p.n_threads = p.n_threads_batch = threads
        if hasattr(p, "kv_unified"):
            p.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, p)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx * rows, 0, rows)

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b = self.batch
        i = b.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens += 1
        return i

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(
            np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).argmax()
        )

    def decode(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self.batch.n_tokens = 0
        last = [self._add(t, pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, t in enumerate(p)]
        last = [i for i in last if self.batch.logits[i]]
        if L.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed on the prompts")
        out = [[self._argmax(i)] for i in last]
        for k in range(1, n):
            self.batch.n_tokens = 0
            idx = [self._add(o[-1], len(p) + k - 1, row, True) for row, (p, o) in enumerate(zip(prompts, out))]
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise SystemExit("llama_decode failed")
            for o, i in zip(out, idx):
                o.append(self._argmax(i))
        return out

    def forced_argmax(self, seq: list[int]) -> list[int]:
        """Argmax at every position of seq fed whole (teacher forcing), as one sequence."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self.batch.n_tokens = 0
        idx = [self._add(t, pos, 0, True) for pos, t in enumerate(seq)]
        L.llama_decode(self.ctx, self.batch)
        return [self._argmax(i) for i in idx]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
    total = sum(map(len, ours))
    return "exact" if sum(prefix) == total else f"{sum(prefix) / total:.0%} before the first difference"


def benchmark_run(run: str, tmp: Path) -> Path:
    """The run to decode: `run` if given, else one trained into tmp (6 layers x 320 on Shakespeare, 200 steps)."""
    if run:
        return Path(run)
    out = tmp / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlm",
            "train",
            "--data",
            "shakespeare",
            "--out",
            str(out),
            "--max-steps",
            "200",
            "--n-layer",
            "6",
            "--d-model",
            "320",
            "--n-head",
            "10",
            "--block-size",
            "512",
            "--batch",
            "8",
            "--vocab-size",
            "1024",
            "--no-progress",
            "--no-plots",
        ],
        check=True,
    )
    return out


def shakespeare_text() -> str:
    path = Path(os.environ.get("GRADLM_DATA_MIRROR", ""), "tinyshakespeare.txt")
    return path.read_text() if path.is_file() else "ROMEO:\nJULIET:\nKING HENRY:\n" * 4000


def shakespeare_lines(n: int = 64) -> list[str]:
    """Prompts: the first n lines of Shakespeare longer than 20 characters."""
    return [ln for ln in shakespeare_text().splitlines() if len(ln) > 20][:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="", help="run directory (default: train one into a temporary folder)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--threads", type=int, default=0, help="threads for both (0 = torch's default)")
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="leave out the compiled decoding step (built in a fresh cache, float32 and int8)",
    )
    ap.add_argument(
        "--repack",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp's weight repacking for its AMX/AVX kernels; auto = on, except on a CPU with AMX, where "
        "llama.cpp's AMX matrix product crashes on this model (ggml-org/llama.cpp#20824)",
    )
    args = ap.parse_args()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    repack = args.repack == "on" or (args.repack == "auto" and not amx)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="gradlm-llamacpp-"))
    run = benchmark_run(args.run, tmp)
    model, tok = load_model(run)
    model.float().eval()
    files = {t: Path(export_gguf(run, tmp / t, t)["out"]) for t in ("f32", "f16", "q8_0")}
    lines = shakespeare_lines()
    n = args.new_tokens
    import llama_cpp

    print(
        f"model: {run} ({model.num_params() / 1e6:.1f}M parameters, {model.cfg.n_layer} x {model.cfg.d_model}, vocab "
        f"{model.cfg.vocab_size}); gradlm float32"
    )
    print(
        f"machine: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores, {threads} threads each; "
        f"torch {torch.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}, weight repacking {'on' if repack else 'off'}; greedy, {n} new "
        f"tokens per row, median of {args.repeats}\n"
    )
    compiled = {}  # the compiled decoding step (gradlm/model/aot.py): built in a fresh cache, then opened again
    if args.compile:
        os.environ["GRADLM_CACHE"] = str(tmp / "cache")
        for form, dtype in (("float32", "float32"), ("int8", "int8")):
            if dtype == "int8" and not Int8.weight_only:
                continue  # no int8 form of the step without AVX512 (the weight-only kernel is scalar)
            cold = timed(lambda: Forward(model, dtype == "int8", step="build").check())[0]
            engine = Engine(model, tok, runtime=Runtime("cpu", dtype, decode_step="cached"))
            warm = timed(lambda: engine.forward.check())[0]
            compiled[f"{form}, compiled"] = engine
            print(
                f"compiled decoding step, {form}: built in {cold:.1f} s with an empty cache; then weights made and "
                f"package opened in {warm:.2f} s"
            )
        print()
    print(
        "| batch | decoder | tokens/s | / gradlm | greedy tokens equal to gradlm's | teacher-forced argmax agreement |"
    )
    print("|---:|---|---:|---:|---|---:|")
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [tok.encode(lines[i * 7 % len(lines)])[:48] for i in range(B)]
        engines = {t: LlamaCpp(f, B, max(map(len, prompts)) + n + 1, threads, repack) for t, f in files.items()}
        ours = {"float32": Engine(model, tok), "int8": Engine(model, tok, runtime=Runtime("cpu", "int8"))}
        ours.update(compiled)
        refs = {k: gradlm_decode(e, prompts, n) for k, e in ours.items()}  # warm-up
        outs = {t: e.decode(prompts, n) for t, e in engines.items()}
        times = {k: [] for k in (*ours, *engines)}
        for _ in range(args.repeats):
            for k, e in ours.items():
                t, refs[k] = timed(lambda: gradlm_decode(e, prompts, n))
                times[k].append(t)
            for k, e in engines.items():
                t, outs[k] = timed(lambda: e.decode(prompts, n))
                times[k].append(t)
        ref = refs["float32"]
        base = B * n / statistics.median(times["float32"])
        for k in ours:
            tps = B * n / statistics.median(times[k])
            same = "" if k == "float32" else agreement(ref, refs[k])
            print(f"| {B} | gradlm ({k}) | {tps:,.0f} | {tps / base:.2f}x | {same} | |")
        for k, e in engines.items():
            tps = B * n / statistics.median(times[k])
            seq = prompts[0] + ref[0]
            with torch.no_grad():
                want = model(torch.tensor([seq]))[0].argmax(-1).tolist()
            got = e.forced_argmax(seq)
            forced = sum(a == b for a, b in zip(want[len(prompts[0]) - 1 : -1], got[len(prompts[0]) - 1 : -1])) / n
            print(
                f"| {B} | llama.cpp {k} | {tps:,.0f} | {tps / base:.2f}x | {agreement(ref, outs[k])} | {forced:.1%} |"
            )


if __name__ == "__main__":
    main()
