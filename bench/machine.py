"""What a benchmark records about the machine it ran on, and the line it prints of it."""

from __future__ import annotations

import os
import platform

import numpy as np
import torch

from frmap.engine.models.runtime import cpu_flags

# the CPU flags that decide the speed of float32 and bfloat16 arithmetic
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu_model() -> str:
    """`lscpu`'s model name (from /proc/cpuinfo), or what `platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model and flags, cores, torch threads, load average now, CUDA device (or None),
    library versions."""
    flags = cpu_flags()
    return {
        "cpu": _cpu_model(),
        "cpu_flags": [f for f in _FLAGS if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def summary(machine: dict) -> str:
    """One line of `describe()`'s record."""
    cuda = f", CUDA {machine['cuda']}" if machine["cuda"] else ""
    flags = ", ".join(machine.get("cpu_flags", [])) or "none of " + ", ".join(_FLAGS)
    return (f"{machine['cores']} cores ({machine['torch_threads']} torch threads), "
            f"{machine['cpu']} ({flags}){cuda}, load average "
            f"{machine['load_average_1min']:.1f}, torch {machine['torch']}")
