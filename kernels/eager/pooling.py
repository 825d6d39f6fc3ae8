"""Max-pooling with one-byte offsets, and its unpooling, in eager torch ops on any device.

Every backend takes the logical [N, C, H, W] tensors and whether they are channels-last; these
ops work on the logical views whatever the memory format, so they do not need to know it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _windows(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """[N, C, oh, kh, ow, kw] view of the pooled part of `x`."""
    (kh, kw), (h, w) = kernel, x.shape[-2:]
    pooled = x[..., :h // kh * kh, :w // kw * kw]
    return pooled.unflatten(3, (w // kw, kw)).unflatten(2, (h // kh, kh))


def max_pool(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, kernel: tuple[int, int],
             channels_last: bool, dead_first: bool) -> None:
    """Pooled maxima into `y` and their window offsets into `offsets`."""
    del channels_last
    windows, kw = _windows(x, kernel), kernel[1]
    y.copy_(F.max_pool2d(x, kernel))
    offsets.zero_()
    for code in reversed(range(kernel[0] * kw)):  # the first maximum wins
        v = windows[:, :, :, code // kw, :, code % kw]
        offsets.masked_fill_((v == y) | (v.isnan() & y.isnan()), code)
    if dead_first:
        offsets.masked_fill_(y <= 0, 0)


def max_unpool(r: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
               kernel: tuple[int, int], channels_last: bool) -> None:
    """`r` routed to each window's offset in `out`, zeros elsewhere."""
    del channels_last
    out.zero_()
    windows, kw = _windows(out, kernel), kernel[1]
    zero = r.new_zeros(())
    for code in range(kernel[0] * kw):
        windows[:, :, :, code // kw, :, code % kw] = torch.where(offsets == code, r, zero)
