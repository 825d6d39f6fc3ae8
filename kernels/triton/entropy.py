"""Triton local entropy of [N, H, W] integer images on torch tensors, and its launcher.

Design. A program owns BLOCK consecutive output pixels of one image (row-major) and the K
offsets (dy, dx) of the footprint's set pixels relative to its centre (h // 2, w // 2). It
gathers every window once into a [BLOCK, KP] tile of levels (KP = K rounded up to a power of
two); a window pixel outside the image, masked out, or past K holds -1. No histogram is built:
for a window of n pixels with levels v_1..v_n and count_q = #{p : v_p == v_q},

    S = -sum_b (c_b / n) log2(c_b / n) = log2 n - (1/n) sum_b c_b log2 c_b
      = (1/n) sum_q (log2 n - log2 count_q),

because a level held by c_b pixels appears c_b times in the sum over q. The program walks the K
offsets once more, reloads the [BLOCK] levels at offset q, counts their matches in the tile (a
[BLOCK, KP] compare and a row sum) and adds log2 n - log2 count_q from a float64 table of log2.
A window holding one value adds exact zeros, so it gets 0.0 bits. The work is O(K^2) compares
per pixel whatever the number of levels (uint16 needs no 65536-bin histogram); the tile lives
in registers, which suits footprints of up to a few hundred pixels.

The levels come from a loader passed as a constexpr function, LOAD(src, aux, image, pixel,
ok, HW, C) -> int32 levels: `_image_levels` reads an integer image, and the response backend
passes one that computes gray levels from float responses on the fly. For the mean, each
program stores the sum of its BLOCK entropies and torch adds these partial sums in a fixed
order (deterministic).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# Levels per [BLOCK, KP] tile: what 8 warps hold in registers without spilling on a GPU (16
# per thread); far more under the interpreter, whose cost is mostly per program instance.
_GPU_TILE = 4096
_GPU_WARPS = 8
_INTERPRETER_TILE = 65536
_MIN_BLOCK = 16


@triton.jit
def _image_levels(src_ptr, aux_ptr, image, pix, ok, HW, C: tl.constexpr):
    """Levels of integer image `image` at flat pixel indices `pix` (0 where not `ok`)."""
    return tl.load(src_ptr + image * HW + pix, mask=ok, other=0).to(tl.int32)


@triton.jit
def _window_levels(src_ptr, aux_ptr, mask_ptr, image, rows, cols, ok, H, W,
                   LOAD: tl.constexpr, C: tl.constexpr):
    """Levels at (rows, cols) of `image`; -1 where not `ok`, outside the image or masked out."""
    ok = ok & (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    pix = rows * W + cols
    if mask_ptr is not None:
        ok = ok & (tl.load(mask_ptr + image * H * W + pix, mask=ok, other=0) != 0)
    return tl.where(ok, LOAD(src_ptr, aux_ptr, image, pix, ok, H * W, C), -1)


@triton.jit
def _entropy_kernel(src_ptr, aux_ptr, mask_ptr, dy_ptr, dx_ptr, log2_ptr, out_ptr,
                    H, W, K, n_blocks,
                    LOAD: tl.constexpr, C: tl.constexpr, MEAN: tl.constexpr,
                    BLOCK: tl.constexpr, KP: tl.constexpr):
    """Entropy of BLOCK output pixels into out, or (MEAN) their sum into out[program]."""
    pid = tl.program_id(0)
    image = (pid // n_blocks).to(tl.int64)
    pix = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < H * W
    r = pix // W
    c = pix % W
    k = tl.arange(0, KP)
    dy = tl.load(dy_ptr + k, mask=k < K, other=0)
    dx = tl.load(dx_ptr + k, mask=k < K, other=0)
    # tile[p, q]: level of window pixel q of output pixel p, -1 where there is none.
    tile = _window_levels(src_ptr, aux_ptr, mask_ptr, image, r[:, None] + dy[None, :],
                          c[:, None] + dx[None, :], inside[:, None] & (k < K)[None, :], H, W,
                          LOAD, C)
    n = tl.sum((tile >= 0).to(tl.int32), axis=1)
    log2_n = tl.load(log2_ptr + n)
    # acc = sum_q (log2 n - log2 count_q) over the window's pixels q.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for q in range(K):
        v = _window_levels(src_ptr, aux_ptr, mask_ptr, image, r + tl.load(dy_ptr + q),
                           c + tl.load(dx_ptr + q), inside, H, W, LOAD, C)
        count = tl.sum((tile == v[:, None]).to(tl.int32), axis=1)
        present = v >= 0
        acc += tl.where(present, log2_n - tl.load(log2_ptr + count, mask=present, other=0.0), 0.0)
    bits = acc / tl.maximum(n, 1).to(tl.float64)  # an empty window gives 0
    if MEAN:
        tl.store(out_ptr + pid, tl.sum(tl.where(inside, bits, 0.0), axis=0))
    else:
        tl.store(out_ptr + image * H * W + pix, bits, mask=inside)


def launch_entropy(
    src: torch.Tensor,
    aux: torch.Tensor | None,
    mask: torch.Tensor | None,
    shape: tuple[int, int, int],
    footprint: np.ndarray,
    load: triton.JITFunction,
    channels: int = 1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run `_entropy_kernel` over the (N, H, W) pixels of `shape`, whose levels `load` reads.

    Args:
        src: the contiguous data `load` reads.
        aux: a second tensor for `load`, or None.
        mask: [N, H, W] contiguous uint8, nonzero = the pixel counts; or None.
        shape: (N, H, W) of the entropy map.
        footprint: [h, w] uint8 0/1 window.
        load: the constexpr loader, see the module docstring.
        channels: C passed to `load`.
        out_dtype: dtype of the returned [N, H, W] map; None returns the [N] float64 mean of
            each map instead, without materialising it.

    Returns:
        [N, H, W] entropy map of `out_dtype`, or [N] float64 means.
    """
    n, h, w = shape
    device = src.device
    fh, fw = footprint.shape
    ys, xs = np.nonzero(footprint)
    dy = torch.as_tensor(ys - fh // 2, dtype=torch.int32, device=device)
    dx = torch.as_tensor(xs - fw // 2, dtype=torch.int32, device=device)
    k = len(ys)
    log2 = torch.arange(k + 1, dtype=torch.float64, device=device).clamp_min(1).log2()
    k_pad = triton.next_power_of_2(k)
    tile = _GPU_TILE if src.is_cuda else _INTERPRETER_TILE
    block = max(_MIN_BLOCK, min(tile // k_pad, triton.next_power_of_2(h * w)))
    n_blocks = triton.cdiv(h * w, block)
    mean = out_dtype is None
    if mean:
        out = torch.empty((n, n_blocks), dtype=torch.float64, device=device)
    else:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    _entropy_kernel[(n * n_blocks,)](
        src, aux, mask, dy, dx, log2, out, h, w, k, n_blocks,
        LOAD=load, C=channels, MEAN=mean, BLOCK=block, KP=k_pad,
        num_warps=_GPU_WARPS, enable_fp_fusion=False,
    )
    return out.sum(dim=1) / (h * w) if mean else out


def _levels_source(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; uint16 widened to int32, which every Triton target loads."""
    return images.to(torch.int32) if images.dtype == torch.uint16 else images


def local_entropy(
    images: torch.Tensor, footprint: np.ndarray, mask: torch.Tensor | None, out_dtype: np.dtype
) -> torch.Tensor:
    """[N, H, W] uint8/uint16 -> [N, H, W] local entropy in bits, `out_dtype` on their device."""
    return launch_entropy(
        _levels_source(images), None, None if mask is None else mask.contiguous(),
        tuple(images.shape), footprint, _image_levels,
        out_dtype=getattr(torch, np.dtype(out_dtype).name),
    )


def mean_local_entropy(
    images: torch.Tensor, footprint: np.ndarray, mask: torch.Tensor | None
) -> torch.Tensor:
    """[N, H, W] uint8/uint16 -> [N] float64 mean of each local-entropy map."""
    return launch_entropy(
        _levels_source(images), None, None if mask is None else mask.contiguous(),
        tuple(images.shape), footprint, _image_levels,
    )
