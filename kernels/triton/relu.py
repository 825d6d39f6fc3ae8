"""Triton ReLU rules: a forward that writes the ReLU and a bit-packed mask, a one-pass backward.

Design. Both kernels see a flat tensor (the caller flattens it in memory order) and give each
program BLOCK consecutive elements, loaded as a [BLOCK // 8, 8] tile: row r holds elements
8r..8r+7, whose mask byte is

    byte_r = sum_i (f_{8r+i} > 0) << i        (bit i of byte j <-> element 8j + i)

the layout the torch backend, `frmap.kernels.eager.relu`, packs too. The forward reads `f` once
and writes `relu(f)` (in place when `y` aliases `f`) and, unless the rule needs no mask, one
byte per 8 elements: 1 bit of state per activation instead of a float copy (32x less). The
backward reads the signal R and the mask bytes once, expands the bits in registers and writes

    gradient   R_in = bit ? R : 0
    deconvnet  R_in = R > 0 ? R : 0        (mask not read)
    guided     R_in = bit and R > 0 ? R : 0

in place when `out` aliases R. Offsets are int64, so tensors may exceed 2**31 elements.
Launches go through `torch.library.wrap_triton`, so that torch.compile sees the kernels inside
the registered operators (`frmap.kernels.torch_ops`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._constants import RULE_CODES
from ._launch import grid

_BLOCK_GPU = 2048  # elements per program on a GPU


@triton.jit
def _tile(pid, n, BLOCK: tl.constexpr):
    """Byte rows [BLOCK // 8] and element offsets [BLOCK // 8, 8] of program `pid`."""
    rows = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    return rows, offs, offs < n


@triton.jit
def _relu_mask_fwd_kernel(x_ptr, y_ptr, bits_ptr, n, n_bytes,
                          WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    rows, offs, inside = _tile(tl.program_id(0), n, BLOCK)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    # relu(f) = f where not f <= 0 (keeps NaN, as torch.relu does)
    tl.store(y_ptr + offs, tl.where(x <= 0, tl.zeros_like(x), x), mask=inside)
    if WRITE_MASK:
        bits = tl.sum((x > 0).to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
        tl.store(bits_ptr + rows, bits.to(tl.uint8), mask=rows < n_bytes)


@triton.jit
def _relu_rule_bwd_kernel(g_ptr, bits_ptr, out_ptr, n, n_bytes,
                          RULE: tl.constexpr, BLOCK: tl.constexpr):
    rows, offs, inside = _tile(tl.program_id(0), n, BLOCK)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    if RULE == 1:
        keep = g > 0
    else:
        byte = tl.load(bits_ptr + rows, mask=rows < n_bytes, other=0).to(tl.int32)
        keep = ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        if RULE == 2:
            keep = keep & (g > 0)
    tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=inside)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"the triton relu kernels take flat contiguous tensors, got {t.shape}")
        if t.device != tensors[0].device:
            raise ValueError("the triton relu kernels take tensors on one device")


def _launch(kernel: triton.JITFunction, first: torch.Tensor, *tensors: torch.Tensor,
            **meta: object) -> None:
    """Launch a kernel over the `first.numel()` elements (and their mask bytes, one per 8) of
    flat tensors; nothing for none."""
    n = first.numel()
    if n == 0:
        return
    block, programs = grid(n, first.device, _BLOCK_GPU, least=8)
    wrap_triton(kernel)[(programs,)](first, *tensors, n, triton.cdiv(n, 8), **meta, BLOCK=block)


def relu_forward(x: torch.Tensor, y: torch.Tensor, bits: torch.Tensor | None) -> None:
    """y = relu(x) and, unless `bits` is None, bits = packed (x > 0); y may be x."""
    _check(x, y, *([] if bits is None else [bits]))
    _launch(_relu_mask_fwd_kernel, x, y, x if bits is None else bits,
            WRITE_MASK=bits is not None)


def relu_backward(g: torch.Tensor, bits: torch.Tensor | None, out: torch.Tensor, rule: str) -> None:
    """out = the rule's R_in from the signal `g` and the packed mask; `out` may be `g`."""
    _check(g, out, *([] if bits is None else [bits]))
    _launch(_relu_rule_bwd_kernel, g, g if bits is None else bits, out, RULE=RULE_CODES[rule])
