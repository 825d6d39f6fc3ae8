"""ReLU rules in eager torch ops on flat tensors, `CHUNK` elements at a time.

Same mask layout as the C++ and Triton kernels: bit i of byte j is element 8j + i.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Elements per step: a multiple of 8 whose temporaries stay in cache.
CHUNK = 1 << 19


def relu_forward(x: torch.Tensor, y: torch.Tensor, bits: torch.Tensor | None) -> None:
    """y = relu(x) and, unless `bits` is None, bits = packed (x > 0); flat tensors, y may be x."""
    for start in range(0, x.numel(), CHUNK):
        yc = torch.clamp_min(x[start:start + CHUNK], 0, out=y[start:start + CHUNK])
        if bits is not None:
            # f > 0 <=> sign(relu(f)) = 1, and byte_j = sum_i sign_{8j+i} 2^i: a matrix-vector
            # product (exact in floating point; much faster than comparisons to bool)
            on = torch.sign(yc).nan_to_num_(0.0)
            if on.dtype not in (torch.float32, torch.float64):
                on = on.float()
            if on.numel() % 8:
                on = F.pad(on, (0, -on.numel() % 8))
            powers = _bit_tables(on.dtype, on.device)[0]
            bits[start // 8:start // 8 + on.numel() // 8] = torch.mv(on.view(-1, 8), powers)


def relu_backward(g: torch.Tensor, bits: torch.Tensor | None, out: torch.Tensor, rule: str) -> None:
    """out = the rule's R_in from the signal `g` and the packed mask; flat, `out` may be `g`."""
    if bits is None:  # deconvnet: (R > 0) * R
        torch.clamp_min(g, 0, out=out)
        return
    _, keep, upper = _bit_tables(g.dtype, g.device)
    for start in range(0, g.numel(), CHUNK):
        gc, oc = g[start:start + CHUNK], out[start:start + CHUNK]
        byte = bits[start // 8:start // 8 + (gc.numel() + 7) // 8].int()
        if rule == "gradient":  # (f > 0) * R
            torch.mul(gc, keep.index_select(0, byte).view(-1)[:gc.numel()], out=oc)
        else:  # (f > 0) * (R > 0) * R = clamp(R, 0, f > 0 ? inf : 0)
            torch.clamp(gc, min=upper.new_zeros(()),
                        max=upper.index_select(0, byte).view(-1)[:gc.numel()], out=oc)


@functools.cache
def _bit_tables(dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[8] powers of two, and [256, 8] tables of a mask byte's bits as 0/1 and as 0/inf."""
    powers = torch.arange(8, device=device)
    on = (torch.arange(256, device=device)[:, None] >> powers) & 1 == 1
    return (2 ** powers).to(dtype), on.to(dtype), torch.where(on, float("inf"), 0.0).to(dtype)
