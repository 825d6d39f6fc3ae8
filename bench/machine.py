"""What a benchmark records about the machine it ran on, and the line it prints of it."""

from __future__ import annotations

import os
import platform

import numpy as np
import torch


def describe() -> dict:
    """CPU, cores, torch threads, load average now, CUDA device (or None), library versions."""
    return {
        "cpu": platform.processor() or platform.machine(),
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
    return (f"{machine['cores']} cores ({machine['torch_threads']} torch threads), "
            f"{machine['cpu']}{cuda}, load average {machine['load_average_1min']:.1f}, "
            f"torch {machine['torch']}")
