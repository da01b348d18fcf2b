"""`make test-cpus`: the tests that touch numerics, run as the CPUs our users and CI have would run them.

A test that passes on the CPU it was written on can fail on another: ATen, oneDNN and MKL pick their kernels from
the CPU's instructions, kernels of different widths sum in different orders and round differently, and gradlm
trains in bfloat16 only where the CPU multiplies it natively. PyTorch lets one machine play the others: this runs
the numerics tests (`pytest -m 'numerics and not timing'`: a test that times the machine needs its cores to itself)
once per setting below, each in its own environment, and says which kernels each really got.

    python tools/test_cpus.py                 # every setting this CPU can play, once
    python tools/test_cpus.py --repeat 3      # three times in a row
    python tools/test_cpus.py --only avx2 -- -x tests/test_trainer.py   # one setting, pytest arguments after --
    python tools/test_cpus.py --only default --only avx2 --parallel       # CI: both at once, one thread each

--parallel runs a round's settings side by side, each held to its share of the cores (one thread each on CI's two
cores: never more threads than cores, since torch's threads spin-wait and run several times slower on a busy CPU);
each setting's output is printed whole when it ends.

A setting the CPU cannot play (AVX512 on an AVX2-only CPU) is skipped and said so. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (what it stands for, its environment). ATEN_CPU_CAPABILITY picks ATen's own kernels; ONEDNN_MAX_CPU_ISA and
# MKL_ENABLE_INSTRUCTIONS cap the libraries behind the matrix products (and a cap below bfloat16 makes gradlm's
# --dtype auto take float32, as on such a CPU); OMP_NUM_THREADS sets torch's threads (1 and 2 both occur).
SETTINGS = {
    "default": (
        "any x86-64 CPU: scalar ATen kernels, oneDNN and MKL held to SSE4, float32, 1 thread",
        {
            "ATEN_CPU_CAPABILITY": "default",
            "ONEDNN_MAX_CPU_ISA": "SSE41",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            "OMP_NUM_THREADS": "1",
        },
    ),
    "avx2": (
        "an AVX2 CPU without AVX512 (older AMD EPYC and Ryzen, most laptops): float32, 2 threads",
        {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "OMP_NUM_THREADS": "2",
        },
    ),
    "avx512": (
        "an AVX512 Xeon without AVX512-BF16 or AMX: float32, 1 thread",
        {
            "ATEN_CPU_CAPABILITY": "avx512",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512",
            "OMP_NUM_THREADS": "1",
        },
    ),
    "native": (
        "this CPU as it is: its widest kernels, bfloat16 where it has AMX or AVX512-BF16, 2 threads",
        {"OMP_NUM_THREADS": "2"},
    ),
}
MARKERS = "numerics and not timing"
CAPABILITY_ORDER = ["DEFAULT", "AVX2", "AVX512"]

PROBE = """
import json, torch
from gradlm.runtime import resolve
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "dtype": resolve(device="cpu").dtype}))
"""


def environment(settings: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "ATEN_CPU_CAPABILITY",
            "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS",
            "OMP_NUM_THREADS",
        )
    }
    env.update(settings)
    return env


def probe(env: dict[str, str]) -> dict:
    """What a process in this environment really gets: ATen's kernels, torch's threads, gradlm's training dtype."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="run every setting this many times in a row (default 1)")
    parser.add_argument("--only", action="append", choices=list(SETTINGS), help="just this setting (repeatable)")
    parser.add_argument(
        "--parallel", action="store_true", help="run a round's settings side by side, the cores shared out (CI)"
    )
    parser.add_argument("pytest_args", nargs="*", help=f"after --: arguments for pytest (default: -m '{MARKERS}')")
    args = parser.parse_args(argv)
    names = args.only or list(SETTINGS)
    results = []
    for round_ in range(1, args.repeat + 1):
        jobs = []  # (name, what, settings, what the probe got)
        for name in names:
            what, settings = SETTINGS[name]
            if args.parallel:  # the cores shared out: one setting's threads never wait on another's
                settings = {**settings, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(names)))}
            got = probe(environment(settings))
            wanted = settings.get("ATEN_CPU_CAPABILITY", "").upper()
            if wanted and got["capability"] != wanted:
                print(
                    f"== {name}: skipped, this CPU cannot play it (asked ATen for {wanted}, got {got['capability']})",
                    flush=True,
                )
                results.append((round_, name, got, "skipped", 0.0))
            else:
                jobs.append((name, what, settings, got))
        pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *(args.pytest_args or ["-m", MARKERS])]

        def run(job: tuple) -> tuple:
            """Run pytest in one setting: its exit status, seconds, and (side by side) its output."""
            name, what, settings, got = job
            header = (
                f"== {name} (round {round_}/{args.repeat}): {what}\n   ATen {got['capability']}, {got['threads']} "
                f"thread(s), training dtype auto = {got['dtype']}; {' '.join(f'{k}={v}' for k, v in settings.items())}"
            )
            if not args.parallel:
                print(header, flush=True)
            start = time.monotonic()
            out = subprocess.run(
                pytest, env=environment(settings), cwd=ROOT, text=True, capture_output=args.parallel, check=False
            )
            return out.returncode, time.monotonic() - start, header + "\n" + (out.stdout or "") + (out.stderr or "")

        with ThreadPoolExecutor(max_workers=max(1, len(jobs)) if args.parallel else 1) as pool:
            for (name, _, _, got), (rc, seconds, output) in zip(jobs, pool.map(run, jobs)):
                if args.parallel:  # side by side: each setting's output in one piece, in order
                    print(output, flush=True)
                results.append((round_, name, got, "passed" if rc == 0 else f"FAILED (exit {rc})", seconds))
    print("\nround  setting  ATen     threads  dtype     result")
    for round_, name, got, result, seconds in results:
        print(
            f"{round_:>5}  {name:<7}  {got['capability']:<7}  {got['threads']:>7}  {got['dtype']:<8}  {result}"
            + (f" in {seconds:.0f} s" if seconds else "")
        )
    failed = sum(r[3].startswith("FAILED") for r in results)
    skipped = sum(r[3] == "skipped" for r in results)
    print(f"settings: {len(results) - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
