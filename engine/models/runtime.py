"""Where a model runs and with which torch settings: device, identity, threads, determinism."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import LibController, ThreadpoolController
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (`/proc/cpuinfo`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matrix arithmetic natively: AVX512-BF16 or AMX on the
    CPU, bf16 tensor cores (compute capability 8 or later) on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def model_identity(model: nn.Module) -> str:
    """`ClassName:sha256-prefix` of the model's parameters and buffers, in state-dict order."""
    return f"{type(model).__name__}:{tensors_digest(model.state_dict().items())[:16]}"


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) of (name, tensor) pairs: each name, dtype and shape, then its bytes."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def torch_settings(threads: int | None = None, *, deterministic: bool | None = None
                   ) -> Iterator[None]:
    """Inside: `threads` intra-op threads and deterministic algorithms on or off (None: as they
    are); the caller's settings are restored afterwards, also when the block raises."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


@functools.cache
def _blas() -> tuple[LibController, ...]:
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Inside: numpy's BLAS (OpenBLAS) on one thread. Its own threads wait spinning on the cores
    after each product, and torch's threads then run beside them: a screen of 256 digits, whose
    detectors' products are small, took 269 ms with them and 202 ms without. The libraries'
    own setters are called directly (threadpoolctl's `limit` asks each library for its state
    again on every call: 16 microseconds, against 2 here, per screen of one image)."""
    changed = [(lib, n) for lib in _blas() if (n := lib.get_num_threads()) != 1]
    for lib, _ in changed:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in changed:
            lib.set_num_threads(n)
