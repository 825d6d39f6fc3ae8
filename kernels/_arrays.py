"""Conversions between the caller's arrays (numpy, torch or DLPack) and what a backend computes on.

torch is never imported here for numpy data: a tensor can only exist once its caller imported
torch, so `is_tensor` looks it up in `sys.modules`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    Array = np.ndarray | torch.Tensor


def is_tensor(x: object) -> bool:
    """Whether `x` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# DLPack device types (dlpack.h): memory the host can read.
_DLPACK_HOST = (1, 3)  # kDLCPU, kDLCUDAHost


def from_dlpack(x: object, name: str) -> tuple[Array | object, Callable[[Array], object]]:
    """(x as numpy or torch, a function that turns a result back into x's kind).

    numpy arrays and torch tensors pass through as they are. Any other array with `__dlpack__`
    (CuPy, JAX, a cuCIM user's data) is imported without a copy: host memory as a numpy
    array, device memory as a torch tensor on the same device (`torch.from_dlpack`); results
    go back through the `from_dlpack` of the array's namespace (`__array_namespace__`, else
    its top-level module, as `cupy.from_dlpack`), again without a copy. Other objects pass
    through, for `check_array` to name.
    """
    if isinstance(x, np.ndarray) or is_tensor(x) or not hasattr(x, "__dlpack__"):
        return x, _same
    space = x.__array_namespace__() if hasattr(x, "__array_namespace__") else sys.modules[
        type(x).__module__.partition(".")[0]]
    if not hasattr(space, "from_dlpack"):
        raise TypeError(f"{name} is a DLPack array, but its namespace {space.__name__} has no "
                        "from_dlpack to return the result as the same kind of array")
    if x.__dlpack_device__()[0] in _DLPACK_HOST:
        return np.from_dlpack(x), space.from_dlpack
    import torch

    return torch.from_dlpack(x), space.from_dlpack


def _same(x: Array) -> Array:
    return x


def check_array(x: object, name: str) -> None:
    """Raise TypeError unless `x` is a numpy array or a torch tensor."""
    if not (isinstance(x, np.ndarray) or is_tensor(x)):
        raise TypeError(f"{name} must be a numpy array, a torch tensor or a DLPack array, got "
                        f"{type(x).__name__}")


def dtype_name(x: Array) -> str:
    return str(x.dtype).removeprefix("torch.")


def for_backend(x: Array, backend: str) -> Array:
    """`x` as the backend computes on it: contiguous numpy for reference/cpu, torch for triton."""
    if backend == "triton":
        import torch

        t = x if is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
        return t.contiguous()
    if is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def for_caller(result: Array, like: Array) -> Array:
    """The backend's `result` as the same kind of array as the caller's input `like`."""
    if is_tensor(like):
        import torch

        t = result if is_tensor(result) else torch.from_numpy(result)
        return t.to(like.device)
    return result.cpu().numpy() if is_tensor(result) else result


def footprint_array(footprint: object, ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Validate a binary footprint of `ndims` dims with at least one element set; as uint8."""
    fp = footprint.detach().cpu().numpy() if is_tensor(footprint) else footprint
    fp = np.asarray(fp)
    if fp.ndim not in ndims:
        dims = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"footprint must be {dims}, got shape {fp.shape}")
    if fp.dtype != np.bool_ and not ((fp == 0) | (fp == 1)).all():
        raise ValueError(
            f"footprint must be binary (bool, or only 0 and 1), got values {np.unique(fp)[:8]}"
        )
    if not fp.any():
        raise ValueError(f"footprint of shape {fp.shape} selects no pixel")
    return np.ascontiguousarray(fp, dtype=np.uint8)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` is a channels-last 4-D tensor that is not also plainly contiguous."""
    import torch

    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))
