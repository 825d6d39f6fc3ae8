"""Backend selection for the kernels: which implementation runs an op, and on how many threads.

`auto` runs Triton on CUDA tensors and the C++ kernel on CPU data (the scikit-image reference
where the extension is not built). A backend that is asked for by name and cannot run raises;
it never falls back silently.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")

_threads: int | None = None


def set_num_threads(threads: int | None) -> None:
    """Set the OpenMP thread count of the C++ backend (None: OpenMP's default)."""
    global _threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _threads = threads


def get_num_threads() -> int:
    """The thread count the C++ backend uses (0: OpenMP's default)."""
    return _threads or 0


@cache
def _cpu_unavailable_reason() -> str | None:
    try:
        importlib.import_module("frmap.kernels.cpu._ext")
    except ImportError as err:
        return f"the C++ extension frmap.kernels.cpu._ext is not built ({err})"
    return None


@cache
def _triton_unavailable_reason() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, *, on_cuda: bool) -> str:
    """Return the concrete backend for `backend` and data on CUDA (`on_cuda`) or on the CPU.

    Raises:
        ValueError: unknown backend name, or data on the wrong device for the named backend.
        RuntimeError: the named backend is not available here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if on_cuda:
            return "triton"
        return "reference" if _cpu_unavailable_reason() else "cpu"
    if backend == "cpu":
        if on_cuda:
            raise ValueError("the cpu backend takes CPU data, got a CUDA tensor")
        if reason := _cpu_unavailable_reason():
            raise RuntimeError(f"the cpu backend is unavailable: {reason}")
    if backend == "triton":
        if reason := _triton_unavailable_reason():
            raise RuntimeError(f"the triton backend is unavailable: {reason}")
        if not on_cuda and not interpreting():
            raise ValueError(
                "the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
            )
    return backend


def _cpu_takes(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def cpu_runs(x: torch.Tensor) -> bool:
    """Whether the C++ backend runs tensor `x` (float32/float64 on the CPU, extension built)."""
    return _cpu_takes(x) and not _cpu_unavailable_reason()


def cpu_tensor_backend(x: torch.Tensor) -> ModuleType:
    """The C++ backend for tensor `x`, asked for by name: raises where it cannot run `x`."""
    if not _cpu_takes(x):
        raise ValueError(f"the cpu backend takes float32/float64 CPU tensors, got {x.dtype} on "
                         f"{x.device}")
    if reason := _cpu_unavailable_reason():
        raise RuntimeError(f"the cpu backend is unavailable: {reason}")
    return load_backend("cpu")


def load_backend(backend: str) -> ModuleType:
    """Import a concrete backend's module only when it is chosen."""
    return importlib.import_module(f"frmap.kernels.{backend}")
