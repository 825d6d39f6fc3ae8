"""Conversions between the caller's arrays (numpy or torch) and what a backend computes on."""

from __future__ import annotations

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def check_array(x: object, name: str) -> None:
    """Raise TypeError unless `x` is a numpy array or a torch tensor."""
    if not isinstance(x, np.ndarray | torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def on_cuda(x: Array) -> bool:
    return isinstance(x, torch.Tensor) and x.is_cuda


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` is a channels-last 4-D tensor that is not also plainly contiguous."""
    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def dtype_name(x: Array) -> str:
    return str(x.dtype).removeprefix("torch.")


def for_backend(x: Array, backend: str) -> Array:
    """`x` as the backend computes on it: contiguous numpy for reference/cpu, torch for triton."""
    if backend == "triton":
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.contiguous()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def for_caller(result: Array, like: Array) -> Array:
    """The backend's `result` as the same kind of array as the caller's input `like`."""
    if isinstance(like, torch.Tensor):
        t = result if isinstance(result, torch.Tensor) else torch.from_numpy(result)
        return t.to(like.device)
    return result.cpu().numpy() if isinstance(result, torch.Tensor) else result


def footprint_array(footprint: object, ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Validate a binary footprint of `ndims` dims with at least one element set; as uint8."""
    fp = footprint.detach().cpu().numpy() if isinstance(footprint, torch.Tensor) else footprint
    fp = np.asarray(fp)
    if fp.ndim not in ndims:
        dims = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"footprint must be {dims}, got shape {fp.shape}")
    if fp.dtype != np.bool_ and not np.isin(fp, (0, 1)).all():
        raise ValueError(
            f"footprint must be binary (bool, or only 0 and 1), got values {np.unique(fp)[:8]}"
        )
    if not fp.any():
        raise ValueError(f"footprint of shape {fp.shape} selects no pixel")
    return np.ascontiguousarray(fp, dtype=np.uint8)
