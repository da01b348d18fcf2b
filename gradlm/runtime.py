"""Where and how a model runs: the device, the dtype and compilation, resolved once for every command.

Every command that runs a model (train, finetune, lr-find, compare, generate, chat, eval, serve, merge) takes
the same three flags with the same meaning, and resolve() turns them into a Runtime:

    --device   auto = CUDA if present (cuda:LOCAL_RANK under torchrun), else the CPU. cpu, cuda, cuda:N
               and mps (Apple's GPU: untested on our machines, so auto never picks it) are taken as asked;
               one that this machine lacks is a ConfigError naming what it has.
    --dtype    training: the precision the matrix products compute in (autocast; weights and optimizer
               state stay float32). auto = bfloat16 where the device multiplies it natively (CUDA from
               compute capability 8.0; CPUs with AMX or AVX512-BF16 that ONEDNN_MAX_CPU_ISA does not
               cap below them), else float32.
               inference: the weights' dtype. auto = bfloat16 on CUDA, float32 on the CPU (bfloat16 matrix
               products were no clear win there at batch 1; docs/benchmarks.md, "int8 decoding"). Commands that decode
               (generate, chat, serve) also take int8 on the CPU: int8 copies of the matrices, multiplied by torch's
               weight-only int8 kernel at batches of up to 4 rows (on AVX512 CPUs; the compiled step's up to 16
               with two threads or more) and by dynamic quantization otherwise; its cost in quality is +0.0001
               held-out bits per byte (docs/benchmarks.md). For them auto =
               int8 on a CPU where ATen runs AVX512 (there batch 1 decodes 1.4x float32's speed, 0.88-1.03x
               llama.cpp's f32), float32 on other CPUs; --dtype float32 is the exact reference.
    --compile  on, off or auto: torch.compile the training step (and on CUDA the evaluation: on the CPU its
               compile is not repaid, docs/benchmarks.md). auto = on when the run is long enough to repay the
               compile at the speed-up it buys (COMPILE_COST: measured on CPUs, nanoGPT's figures for CUDA): on
               CUDA under a time budget that repays it or a step or token budget; on the CPU under a time budget
               that repays it (bf16 ~3.5 minutes, float32 ~5.7) where a C++ compiler is on PATH (inductor needs
               one), or one that repays reading back the graphs of a shape that compiled before in this cache
               (WARM_COMPILE_S, ~5 s: from ~25 s of --max-time in bf16, ~55 s in float32; the trainer checks
               once the shape is known), never under a step or token budget (its length is unknown before the
               run); never on MPS. If compiling that auto chose fails, training goes on uncompiled with one
               warning line. Decoding on the
               CPU (generate, chat, serve) compiles one thing: the decoding step, ahead of time (gradlm/model/aot.py:
               1.4-1.7x eager's tokens/s at batch 1; built once per model shape, ~20 s a package (float32 on a CPU
               not Intel's: two, the second for few rows), kept in $GRADLM_CACHE/aot):
               on = built before the first token if missing; auto = used when it is in the cache, and serve and
               chat have it built in the background the first time (resolve_decode_step). Decoding on CUDA: on =
               the one-token step recorded as CUDA graphs, one per batch size (gradlm/model/infer.py GraphStep;
               milliseconds, no compiler; not yet measured on a GPU), auto = off; eval: on compiles the scored
               forward, auto = off.
               Compiled graphs are kept in $GRADLM_CACHE/inductor; each compile is said in one line with its time,
               and what failed to compile runs eagerly after one warning line (gradlm/model/compiling.py). A step
               that compiled does not set the time budget's pace.

The rules are pure functions of the flags and of what the machine has (Machine), so tests can state them
for any machine, and every rank and every resume of a run makes the same choice. The Runtime then owns
what depends on the device: autocast, moving batches (pinned memory and non-blocking copies on CUDA), the
random state a checkpoint keeps (CPU and CUDA), the device collectives run on, and synchronisation for
timing.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gradlm.errors import ConfigError

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (CUDA if present, else the CPU)"
DTYPES = ("auto", "float32", "bfloat16")
DECODING_DTYPES = (*DTYPES, "int8")
COMPILE = ("auto", "on", "off")
# What compiling the training step costs and buys, per kind of device: (seconds to compile with an empty inductor
# cache, speed-up of a whole run). auto compiles where budget_s * (1 - 1 / speed-up) > seconds.
# CPU: measured on a 2-core Sapphire Rapids Xeon (docs/benchmarks.md, "Compiling the training step" and "The
# training step, second pass"): bf16, 4-minute runs of --size auto's 5 x 224, batch 8: the step compiled in 31.8-41.3
# s with an empty cache, and with dropout 0.1 its steps came 1.47x as fast as eager ones (148.7 -> 101.3 ms); the
# step alone with dropout 0.1 measured 1.25-1.42x on other occasions, and a 1-minute run of the demo's shape 1.22x
# (75.6 -> 61.8 ms); the evaluations stay uncompiled on the CPU (their 23-28 s compile saved 0.6 s an evaluation).
# So 1.25x for the whole run; before the step took dropout's bytes as an input and q/k/v as one product, 1.15x.
# float32, the demo's shape: 31.4 s, 1.1x (not measured again). So a CPU run compiles from ~3.5 minutes of
# --max-time in bf16, ~5.7 in float32. CUDA: nanoGPT's figures for a GPT-2-small step (~1 minute, 250 -> 135
# ms/iter), not yet measured here.
COMPILE_COST = {"cuda": (60.0, 1.5), "cpu_bf16": (42.0, 1.25), "cpu": (31.0, 1.1)}
# Compiling a step whose graphs inductor already keeps (the same shape compiled in this cache before): 2.8-4.7 s for
# the demo's shape in a whole run on that CPU (3.1-3.6 s for the step alone, ~1.5 s of it inductor probing the CPU's
# vector instructions in subprocesses); used until the cache's record (gradlm.model.compiling.remember_compile) holds a
# warm compile's own time.
WARM_COMPILE_S = 5.0


@dataclass(frozen=True)
class Machine:
    """What this machine offers a model: CUDA devices (and whether they multiply bfloat16 natively),
    Apple's MPS, whether its CPU multiplies bfloat16 natively (AMX or AVX512-BF16), and whether it decodes int8 fast."""

    cuda: int = 0
    cuda_bf16: bool = False
    mps: bool = False
    cpu_bf16: bool = False
    cpu_int8: bool = False  # ATen runs its AVX512 kernels: torch's weight-only int8 product is vectorised
    cpu_compiler: bool = True  # a C++ compiler on PATH, which inductor needs to compile for the CPU

    @classmethod
    def here(cls) -> Machine:
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        cpu_bf16 = onednn_allows_bf16() and any(
            getattr(torch.cpu, probe, lambda: False)()
            for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
        cuda_bf16 = bool(cuda) and all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(cuda))
        int8 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        compiler = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++") if c)
        return cls(cuda, cuda_bf16, mps, cpu_bf16, int8, compiler)

    def describe(self) -> str:
        gpus = f"{self.cuda} CUDA GPU{'s' if self.cuda != 1 else ''}" if self.cuda else "no CUDA GPU"
        return gpus + (", Apple MPS" if self.mps else "")


# oneDNN's instruction sets, oldest first (its ONEDNN_MAX_CPU_ISA values, with their older and newer names);
# from AVX512_CORE_BF16 on it multiplies bfloat16 in hardware.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "DEFAULT",
    "ALL",
)


def onednn_allows_bf16(environ=os.environ) -> bool:
    """False where ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) caps oneDNN, which runs the CPU's bfloat16
    matrix products, below the instructions that multiply bfloat16: there they are emulated, slower than float32,
    as on a CPU without them (`make test-cpus` sets it so, to meet such CPUs' numerics)."""
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if cap not in ONEDNN_ISAS:
        return True  # a name this list does not know is newer than it: no cap that matters here
    return ONEDNN_ISAS.index(cap) >= ONEDNN_ISAS.index("AVX512_CORE_BF16")


def resolve_device(device: str, machine: Machine, local_rank: int = 0) -> str:
    """The device a model runs on: "cpu", "cuda:N" or "mps" (see the module docstring)."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return f"cuda:{local_rank}" if machine.cuda else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "mps":
        if not machine.mps:
            raise ConfigError(
                f"--device mps was asked for but this machine has no Apple MPS device ({machine.describe()}); use "
                "--device cpu or auto"
            )
        return "mps"
    if device == "cuda" or device.startswith("cuda:"):
        index = local_rank if device == "cuda" else device.removeprefix("cuda:")
        if not machine.cuda:
            raise ConfigError(
                f"--device {device} was asked for but this machine has no CUDA GPU; use --device cpu or auto"
            )
        if not str(index).isdigit() or int(index) >= machine.cuda:
            raise ConfigError(
                f"--device {device}: this machine has {machine.describe()} (cuda:0 to cuda:{machine.cuda - 1})"
            )
        return f"cuda:{int(index)}"
    raise ConfigError(f"--device must be {DEVICE_HELP}, got {device!r}")


def native_bf16(device: str, machine: Machine) -> bool:
    """Whether device multiplies bfloat16 natively (faster than float32)."""
    kind = device.split(":")[0]
    return machine.cuda_bf16 if kind == "cuda" else machine.cpu_bf16 if kind == "cpu" else False


def resolve_dtype(dtype: str, device: str, machine: Machine, inference: bool = False, decoding: bool = False) -> str:
    """ "float32" or "bfloat16" (see the module docstring): training's compute dtype, or with inference=True
    the weights' dtype for decoding and scoring; "int8" too for decoding on the CPU."""
    dtype = (dtype or "auto").strip().lower()
    allowed = DECODING_DTYPES if decoding else DTYPES
    if dtype == "int8" and not decoding:
        what = "training computes" if not inference else "scoring computes"
        raise ConfigError(
            f"--dtype int8 is for decoding on the CPU (generate, chat, serve); {what} in float32 or bfloat16"
        )
    if dtype not in allowed:
        raise ConfigError(f"--dtype must be {', '.join(allowed)}, got {dtype!r}")
    if dtype == "int8" and device != "cpu":
        raise ConfigError(f"--dtype int8 runs on the CPU (torch's int8 CPU kernels); on {device} use bfloat16")
    if dtype != "auto":
        return dtype
    if inference:
        if device.startswith("cuda"):
            return "bfloat16"
        return "int8" if decoding and device == "cpu" and machine.cpu_int8 else "float32"
    return "bfloat16" if native_bf16(device, machine) else "float32"


def resolve_compile(
    compile: str | bool,
    device: str,
    budget_s: float | None = None,
    inference: bool = False,
    dtype: str = "float32",
    machine: Machine | None = None,
    compile_s: float | None = None,
) -> bool:
    """Whether to torch.compile (see the module docstring). budget_s: the run's time budget in seconds, None when
    it has none (a step or token budget); dtype: the run's compute dtype (a bf16 step gains more); compile_s: what
    compiling will take where that is known (the shape's graphs are in the cache), else COMPILE_COST's empty-cache
    figure."""
    if isinstance(compile, bool):  # config files written before "auto" existed
        return compile
    compile = (compile or "auto").strip().lower()
    if compile not in COMPILE:
        raise ConfigError(f"--compile must be {', '.join(COMPILE)}, got {compile!r}")
    if compile != "auto":
        return compile == "on"
    kind = device.split(":")[0]
    if inference or kind not in ("cuda", "cpu"):
        return False
    if kind == "cpu" and (budget_s is None or not (machine or Machine()).cpu_compiler):
        return False
    seconds, speedup = compile_cost(device, dtype)
    return budget_s is None or budget_s * (1 - 1 / speedup) > (seconds if compile_s is None else compile_s)


def resolve_decode_step(compile: str | bool, device: str, dtype: str, machine: Machine, serving: bool = False) -> str:
    """What a decoding command does with the compiled decoding step (gradlm/model/aot.py; Forward's step modes): on
    the CPU with float32 or int8 weights (int8 where its weight-only kernel is vectorised), --compile on builds it
    before the first token if it is not in the cache; auto uses it from the cache, and a command that keeps running
    (serving: serve, chat) has it built in the background the first time. On CUDA, --compile on records the step as
    CUDA graphs ("graphs"). Off elsewhere and with --compile off."""
    compile = compile if isinstance(compile, str) else "on" if compile else "off"
    if device.startswith("cuda") and compile == "on":
        return "graphs"
    if device != "cpu" or dtype not in ("float32", "int8") or compile == "off":
        return "off"
    if dtype == "int8" and not machine.cpu_int8:
        return "off"
    if compile == "on":
        return "build"
    return "background" if serving and machine.cpu_compiler else "cached"


def compile_cost(device: str, dtype: str) -> tuple[float, float]:
    """(seconds to compile with an empty cache, speed-up of a whole run) for training on this device in this dtype."""
    return COMPILE_COST["cuda" if device.startswith("cuda") else "cpu_bf16" if dtype == "bfloat16" else "cpu"]


@dataclass(frozen=True)
class Runtime:
    """A resolved device, dtype and compile choice, and what depends on the device."""

    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    decode_step: str = "off"  # decoding: the compiled step's mode on the CPU, "graphs" on CUDA (resolve_decode_step)

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The weights' torch dtype (int8 decoding keeps float32 weights beside its int8 copies)."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def autocast(self):
        """The compute-precision context: bfloat16 autocasts the matrix products (weights stay float32);
        float32 changes nothing. `with rt.autocast(): ...`"""
        return torch.autocast(self.kind, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors on this runtime's device: on CUDA from pinned memory without blocking the host (the copy
        overlaps the previous step's work), elsewhere a plain .to()."""
        if self.kind != "cuda":
            return tuple(t.to(self.device) for t in tensors)
        return tuple((t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True) for t in tensors)

    def synchronize(self) -> None:
        """Wait for the device's queued work (before reading a clock)."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.kind == "mps":
            torch.mps.synchronize()

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The random state a checkpoint keeps: the CPU generator's, and this CUDA device's when on CUDA
        (dropout on the GPU draws from it)."""
        state = {"cpu": torch.get_rng_state()}
        if self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Restore rng_state()'s result (or a bare CPU state, as checkpoints before this kept)."""
        if isinstance(state, torch.Tensor):
            state = {"cpu": state}
        torch.set_rng_state(state["cpu"])
        if self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        """A tensor for a collective (all-reduce): on the GPU under nccl, which only reduces CUDA tensors."""
        return torch.tensor(values, dtype=dtype, device=self.device if self.kind == "cuda" else "cpu")

    def describe(self) -> str:
        step = {
            "build": ", compiled decoding step",
            "background": ", compiled decoding step when built",
            "graphs": ", decoding step in CUDA graphs",
        }
        return f"{self.device}, {self.dtype}" + (", compiled" if self.compile else step.get(self.decode_step, ""))


def resolve(
    device: str = "auto",
    dtype: str = "auto",
    compile: str | bool = "auto",
    *,
    inference: bool = False,
    decoding: bool = False,
    serving: bool = False,
    budget_s: float | None = None,
    machine: Machine | None = None,
) -> Runtime:
    """The Runtime for these flags on this machine (or on `machine`, for tests). inference: a command that
    runs a trained model (its dtype is the weights'); decoding: one that generates (int8 allowed); serving: one that
    keeps running (serve, chat: the compiled decoding step is worth building in the background)."""
    machine = machine or Machine.here()
    dev = resolve_device(device, machine, int(os.environ.get("LOCAL_RANK", "0")))
    inference = inference or decoding or serving
    decoding = decoding or serving
    dtype = resolve_dtype(dtype, dev, machine, inference, decoding)
    step = resolve_decode_step(compile, dev, dtype, machine, serving) if decoding else "off"
    # decoding on the CPU compiles its own step (where it has a form) and never torch.compiles the eager step:
    # with the shapes dynamic that ran at 0.65x eager's speed (gradlm/model/aot.py); on CUDA it records its step as
    # CUDA graphs instead
    compiled = resolve_compile(compile, dev, budget_s, inference, dtype, machine) and not (
        decoding and (dev == "cpu" or step == "graphs")
    )
    return Runtime(dev, dtype, compiled, step)


def set_fast_matmul(device: str) -> None:
    """On CUDA, float32 matrix products may use TF32 tensor cores (10 mantissa bits, float32 range): ~3x
    the strict float32 rate on Ampere and later; bfloat16 autocast is unaffected."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
