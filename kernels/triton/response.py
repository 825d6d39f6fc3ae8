"""Triton response images and the fused response score (METHOD steps 4-6), and their launchers.

Design. Per image, torch reduces the mean and the population std of all C*H*W responses in
float64 and stores (mean, std + 1e-5). `_gray_levels` then turns responses into gray levels in
registers, each step in float64 as numpy rounds it (FMA contraction is off):

    level = trunc(255 * clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0, 1))   per channel
    gray  = (19595 R + 38470 G + 7471 B + 2^15) >> 16                      PIL convert("L")

`response_image` stores these levels, BLOCK pixels per program. `response_score` hands
`_gray_levels` to the entropy kernel as its loader: each window computes the gray levels of
its pixels straight from the responses, so neither the gray image nor the entropy map is
written to memory; only one partial entropy sum per program is.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .entropy import launch_entropy

_BLOCK_GPU = 1024
_BLOCK_INTERPRETER = 65536


@triton.jit
def _channel_level(v, mean, denom):
    """trunc(255 * clip((v - mean) / denom * 0.1 + 0.5, 0, 1)) in float64, as int32."""
    x = (v.to(tl.float64) - mean) / denom * 0.1 + 0.5
    return (tl.minimum(tl.maximum(x, 0.0), 1.0) * 255.0).to(tl.int32)


@triton.jit
def _gray_levels(resp_ptr, stats_ptr, image, pix, ok, HW, C: tl.constexpr):
    """Gray levels of response image `image` at flat pixel indices `pix` (any where not `ok`)."""
    mean = tl.load(stats_ptr + 2 * image)
    denom = tl.load(stats_ptr + 2 * image + 1)
    base = resp_ptr + image * C * HW + pix
    red = _channel_level(tl.load(base, mask=ok, other=0.0), mean, denom)
    if C == 1:
        gray = red
    else:
        green = _channel_level(tl.load(base + HW, mask=ok, other=0.0), mean, denom)
        blue = _channel_level(tl.load(base + 2 * HW, mask=ok, other=0.0), mean, denom)
        gray = (19595 * red + 38470 * green + 7471 * blue + 0x8000) >> 16
    return gray


@triton.jit
def _response_image_kernel(resp_ptr, stats_ptr, out_ptr, HW, n_blocks,
                           C: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    image = (pid // n_blocks).to(tl.int64)
    pix = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = pix < HW
    gray = _gray_levels(resp_ptr, stats_ptr, image, pix, ok, HW, C)
    tl.store(out_ptr + image * HW + pix, gray.to(tl.uint8), mask=ok)


def _stats(responses: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 2] float64 (mean, population std + 1e-5) over each image."""
    std, mean = torch.std_mean(responses.to(torch.float64), dim=(1, 2, 3), correction=0)
    return torch.stack([mean, std + 1e-5], dim=1).contiguous()


def response_image(responses: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] float32/float64 responses (C = 1 or 3) -> [N, H, W] uint8 gray images."""
    n, c, h, w = responses.shape
    block = min(_BLOCK_GPU if responses.is_cuda else _BLOCK_INTERPRETER,
                triton.next_power_of_2(h * w))
    n_blocks = triton.cdiv(h * w, block)
    out = torch.empty((n, h, w), dtype=torch.uint8, device=responses.device)
    _response_image_kernel[(n * n_blocks,)](
        responses, _stats(responses), out, h * w, n_blocks, C=c, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return out


def response_score(responses: torch.Tensor, footprint: np.ndarray) -> torch.Tensor:
    """[N, C, H, W] float responses -> [N] float64 mean local entropy of their gray images."""
    n, c, h, w = responses.shape
    return launch_entropy(
        responses, _stats(responses), None, (n, h, w), footprint, _gray_levels, channels=c
    )
