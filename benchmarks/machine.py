"""What every benchmark says about the machine it ran on: the CPU's name and the features that decide its kernels.

from machine import cpu_name, cpu_flags      # benchmarks run as `python benchmarks/NAME.py`, from this folder
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX"}


def _field(name: str) -> str:
    lines = CPUINFO.read_text().splitlines() if CPUINFO.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == name), "")


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    return _field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The features that decide which kernels torch, oneDNN and llama.cpp run: AVX2, AVX512, AVX512-BF16, AMX."""
    flags = set(_field("flags").split())
    return ", ".join(v for k, v in FEATURES.items() if k in flags) or "no AVX2"
