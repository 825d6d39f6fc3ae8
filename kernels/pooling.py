"""Max-pooling that records each window's argmax as a one-byte offset, and its unpooling.

For a max-pool whose stride equals its kernel (kh, kw), without padding, in floor mode (VGG's),
`max_pool_offsets` returns the pooled maxima and, per pooled element, the offset a * kw + b of
the window's first maximum in row-major order (NaN counting as larger than any number): the
position `max_pool2d(..., return_indices=True)` gives for NaN-free windows, in 1 byte instead of
8. With `dead_first=True` a window without a positive value gets offset 0, the argmax of
`max_pool2d(relu(x))`: a ReLU followed by a max-pool is then computed as the pool followed by
the ReLU. `max_unpool_offsets` routes a signal on the pooled grid back to those positions (the
max-pool's vector-Jacobian product), zeros elsewhere, rows and columns left out by the floor
included.

Backends (see `frmap.kernels._dispatch`): `cpu`, the C++ kernels, for float32/float64 CPU tensors;
`torch`, eager torch ops on any device; `auto` picks `cpu` where it runs, else `torch`. Outputs
keep the input's memory format (channels-last or contiguous).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import torch_ops
from ._arrays import is_channels_last


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"kernel_size must be a positive int or a pair of them, got {value!r}")
    if pair[0] * pair[1] > 256:
        raise ValueError(f"the window {pair} has more than 256 elements: offsets are one byte")
    return pair


def _planes(x: torch.Tensor, name: str) -> torch.Tensor:
    """`x` as a dense [N, C, H, W] float tensor: contiguous or channels-last."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        kind = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
        raise ValueError(f"{name} must be a [N, C, H, W] floating-point tensor, got {kind}")
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x if dense else x.contiguous()


def max_pool_offsets(x: torch.Tensor, kernel_size: int | Sequence[int], *,
                     dead_first: bool = False,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool with stride = kernel, and each window's argmax as a one-byte offset.

    Args:
        x: [N, C, H, W] floats, contiguous or channels-last.
        kernel_size: (kh, kw) or one int, at most 256 elements.
        dead_first: offset 0 for windows without a positive value (pooling after a ReLU).
        backend: "auto", "cpu" or "torch".

    Returns:
        y [N, C, H // kh, W // kw] and uint8 offsets of the same shape, in x's memory format.
    """
    kernel = _pair(kernel_size)
    x = _planes(x, "x")
    channels_last = is_channels_last(x)
    run = torch_ops.kernel("pooling", "max_pool", backend, x)
    n, c, h, w = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty(n, c, h // kernel[0], w // kernel[1], dtype=x.dtype, device=x.device,
                    memory_format=fmt)
    offsets = torch.empty(y.shape, dtype=torch.uint8, device=x.device, memory_format=fmt)
    if y.numel():
        run(x, y, offsets, kernel, channels_last, dead_first)
    return y, offsets


def max_unpool_offsets(r: torch.Tensor, offsets: torch.Tensor, kernel_size: int | Sequence[int],
                       size: Sequence[int], *, out: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """The signal `r` at the pooled grid routed back to each window's recorded maximum.

    Args:
        r: [N, C, oh, ow] floats, in the memory format of `offsets`.
        offsets: what `max_pool_offsets` returned.
        kernel_size: the pool's kernel.
        size: (H, W) of the pool's input; H // kh = oh and W // kw = ow.
        out: where to write the result (every element is written), e.g. a buffer reused
            across calls; [N, C, H, W] of r's dtype and device in the memory format of
            `offsets`. None: a new tensor.
        backend: "auto", "cpu" or "torch".

    Returns:
        [N, C, H, W] in the memory format of `offsets`: r at the maxima, 0 elsewhere.
    """
    kernel = _pair(kernel_size)
    r = _planes(r, "r")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.uint8 or offsets.shape != r.shape:
        raise ValueError(f"offsets must be uint8 of r's shape {tuple(r.shape)}, got "
                         f"{offsets.dtype} of shape {tuple(offsets.shape)}")
    h, w = size
    if (h // kernel[0], w // kernel[1]) != tuple(r.shape[-2:]):
        raise ValueError(f"size {(h, w)} does not pool to r's {tuple(r.shape[-2:])} with kernel "
                         f"{kernel}")
    channels_last = is_channels_last(offsets)
    if not channels_last:
        offsets = offsets.contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    r = r.contiguous(memory_format=fmt)
    run = torch_ops.kernel("pooling", "max_unpool", backend, r)
    shape = (*r.shape[:2], h, w)
    if out is None:
        out = torch.empty(shape, dtype=r.dtype, device=r.device, memory_format=fmt)
    elif (out.shape != shape or out.dtype != r.dtype or out.device != r.device
          or not out.is_contiguous(memory_format=fmt)):
        raise ValueError(f"out must be a {fmt} {r.dtype} tensor of shape {shape} on {r.device}, "
                         f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}")
    if out.numel():
        run(r, offsets, out, kernel, channels_last)
    return out
