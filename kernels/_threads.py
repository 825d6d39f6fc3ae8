"""The thread count of the C++ backend: set by the caller, read by `frmap.kernels.cpu`."""

from __future__ import annotations

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
