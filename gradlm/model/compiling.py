"""torch.compile that never surprises a user: it says when it compiles, keeps what it compiled, and never crashes.

    step = Compiled(fused_forward, "the decode step", dynamic=True)
    step(model, weights, idx, cache, last_only)     # the first call (and each new shape) compiles, and says so

- Each call that compiled a new graph writes one line (CompileWatch does the same for work compiled elsewhere: the
  trainer's step and its evaluation): "compiling the decode step: 12.3 s (cached in
  ~/.cache/gradlm/inductor for next time)". Inductor's on-disk caches (FX graphs, AOTAutograd, kernels) live in
  $GRADLM_CACHE/inductor unless TORCHINDUCTOR_CACHE_DIR says otherwise, so a second process compiles the same
  shapes in seconds.
- A call that fails to compile runs eagerly instead, with one warning line, and every later call is eager too.
  (A failure while compiling happens before the graph runs, so nothing ran twice; an error of the function itself
  is raised again by the eager call.) `--compile off` never compiles at all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradlm.errors import cause
from gradlm.layout import cache_dir


# Functions a graph may call that AOTAutograd's cache would otherwise refuse: entering and leaving an autocast region
# (explicit_causal_attention turns bf16 autocast off for its scores). Their effect is fixed by their arguments, which
# are constants of the graph and so of its cache key. With them refused, a warm compile of a 4 x 192 bf16 training
# step traced and partitioned its joint graph again: 6.3 s instead of ~2.5 (docs/benchmarks.md).
CACHEABLE = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def use_cache() -> Path:
    """Where inductor keeps what it compiled: the user's TORCHINDUCTOR_CACHE_DIR, else $GRADLM_CACHE/inductor. Torch
    writes its own /tmp default into that variable when parts of it are imported or first run (torch._dynamo's
    imports, torch.optim's first step), so a value equal to that default does not count as the user's choice.
    Also lets the caches keep graphs with autocast regions (CACHEABLE)."""
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    marked = getattr(torch._inductor.config, "unsafe_marked_cacheable_functions", None)
    if isinstance(marked, dict):  # (torch 2.8 on; older ones recompile such graphs, as before)
        marked.update(dict.fromkeys(CACHEABLE, torch.__version__))

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = given if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()) else None
    path = path or str(cache_dir() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return Path(path)


@functools.cache
def cpu_features() -> str:
    """This CPU's model and instruction sets: compiled code is built for them (-march=native) and would fault on a
    CPU without one of them (a cache shared between machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    return " | ".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def machine_key() -> list:
    """What code compiled here depends on besides its graph: torch, the CPU, the kernels ATen runs
    (ATEN_CPU_CAPABILITY caps them) and the number of threads (inductor writes it into its loops)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return [torch.__version__, cpu_features(), capability, torch.get_num_threads()]


def compiled_before(key: list) -> float | None:
    """Whether the graphs of key compiled in the inductor cache in use before (remember_compile noted it), so that
    compiling them again mostly reads them back: the fastest such second compile's seconds, 0.0 when it compiled only
    once (its time then was a cold one), None if never (or the record is unreadable)."""
    entry = _read_record().get(_key_text(key))
    if not isinstance(entry, dict):
        return None
    warm = entry.get("warm_s")
    return float(warm) if isinstance(warm, (int, float)) else 0.0


def remember_compile(key: list, seconds: float) -> None:
    """Note in the inductor cache that the graphs of key compiled there, in seconds (compiled_before reads it). A
    record that cannot be written is skipped (a read-only cache, a full disk): it only saves later runs time."""
    record, seen = _record_path(), _read_record()
    entry = seen.get(_key_text(key))
    if isinstance(entry, dict):  # compiled here before: this compile read them back (or, evicted, compiled again)
        warm = entry.get("warm_s")
        entry = {"warm_s": round(min(seconds, warm) if isinstance(warm, (int, float)) else seconds, 2)}
    seen[_key_text(key)] = entry if isinstance(entry, dict) else {"cold_s": round(seconds, 2)}
    part = record.with_name(f"{record.name}.{os.getpid()}.part")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(seen, indent=1, sort_keys=True))
        part.replace(record)
    except OSError:
        with contextlib.suppress(OSError):  # (where no folder could be made, not even the part is there)
            part.unlink(missing_ok=True)


def _read_record() -> dict:
    try:
        seen = json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return {}
    return seen if isinstance(seen, dict) else {}


def _key_text(key: list) -> str:
    text = json.dumps([*key, *machine_key()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _record_path() -> Path:
    return use_cache() / "gradlm-compiled.json"


def compiler_failed(error: BaseException) -> bool:
    """Whether error is torch.compile's own failure to compile (dynamo's backend or inductor, a C++ compiler missing
    or failing among them), not an error of the code it compiled."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError is one
    from torch._inductor.exc import CppCompileError

    return isinstance(error, (BackendCompilerFailed, CppCompileError))


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class CompileWatch:
    """Says the compiles that happened during a piece of work done elsewhere (the trainer's compiled model compiles
    inside its first step and its first evaluation): after(what, seconds) writes one line if dynamo compiled a new
    graph since the last call, and says whether it did (the trainer's clock does not take such a step as its pace)."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.cache, self.seen = say, use_cache(), graphs_compiled()

    def after(self, what: str, seconds: float) -> bool:
        """Whether what took `seconds` compiled (and then it was said)."""
        compiled = graphs_compiled() > self.seen
        if compiled:
            self.say(f"compiling {what}: {seconds:.1f} s (cached in {self.cache} for next time)")
        self.seen = graphs_compiled()
        return compiled


class Compiled:
    """fn through torch.compile(**options), saying each compile and falling back to fn when compiling fails.
    what names fn in the lines it writes; say writes them (default: to stderr)."""

    def __init__(self, fn: Callable, what: str, say: Callable[[str], None] | None = None, **options):
        self.eager, self.what = fn, what
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.watch = CompileWatch(lambda line: self.say(line))  # self.say may be replaced later
        self.fn = torch.compile(fn, **options)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any failure of the compiler: run it as written)
            self.failed = True
            self.say(
                f"warning: compiling {self.what} failed ({cause(e)}); running it without "
                "compiling (--compile off skips the attempt)"
            )
            return self.eager(*args, **kwargs)
        self.watch.after(self.what, time.perf_counter() - start)
        return out
