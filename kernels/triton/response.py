"""Triton response images and the response score (METHOD steps 4-6), and their launchers.

Design, three passes over one batch:

1. `_moments_kernel` reads the float32/float64 responses once: each program reduces BLOCK
   values of one image to (sum, sum of squared deviations from the block's mean) in float64,
   in registers; torch merges the blocks (Chan et al.: M2 = sum_b M2_b + n_b (mean_b - mean)^2)
   into the mean and the population std of each image. No float64 copy of the responses.
2. `_gray_kernel` turns responses into uint8 gray levels, each step in float64 as numpy rounds
   it (FMA contraction off):
       level = trunc(255 * clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0, 1))   per channel
       gray  = (19595 R + 38470 G + 7471 B + 2^15) >> 16                      PIL convert("L")
3. The score is the mean-entropy kernel of `entropy.py` on that gray image.

Operation counts per pixel, old (one fused kernel) vs new: the fused kernel computed KP + K
gray levels per output pixel (KP = K rounded up to a power of two: 25 for square(3), 405 for
disk(7)), each from C float responses in float64, and its statistics went through a float64
copy of the responses; now each gray level is computed once (pass 2) and the entropy kernel
reads K uint8 levels per pixel from a gray image that stays in L2 (3.2 MB for 64 images of
224x224). The moments read each response once. The only host-device traffic is the launches.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import grid
from .entropy import mean_local_entropy

_GPU_BLOCK = 1024


@triton.jit
def _moments_kernel(resp_ptr, part_ptr, CHW, n_blocks, BLOCK: tl.constexpr):
    """part[program] = (sum, sum of squared deviations from their mean) of BLOCK values."""
    pid = tl.program_id(0)
    image = (pid // n_blocks).to(tl.int64)
    i = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = i < CHW
    x = tl.load(resp_ptr + image * CHW + i, mask=ok, other=0.0).to(tl.float64)
    total = tl.sum(x, axis=0)
    mean = total / tl.minimum(CHW - (pid % n_blocks) * BLOCK, BLOCK).to(tl.float64)
    dev = tl.where(ok, x - mean, 0.0)
    tl.store(part_ptr + 2 * pid, total)
    tl.store(part_ptr + 2 * pid + 1, tl.sum(dev * dev, axis=0))


@triton.jit
def _channel_level(v, mean, denom):
    """trunc(255 * clip((v - mean) / denom * 0.1 + 0.5, 0, 1)) in float64, as int32."""
    x = (v.to(tl.float64) - mean) / denom * 0.1 + 0.5
    return (tl.minimum(tl.maximum(x, 0.0), 1.0) * 255.0).to(tl.int32)


@triton.jit
def _gray_kernel(resp_ptr, stats_ptr, out_ptr, HW, n_blocks, C: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Gray levels of BLOCK pixels of one response image; stats = (mean, std + 1e-5)."""
    pid = tl.program_id(0)
    image = (pid // n_blocks).to(tl.int64)
    pix = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = pix < HW
    mean = tl.load(stats_ptr + 2 * image)
    denom = tl.load(stats_ptr + 2 * image + 1)
    base = resp_ptr + image * C * HW + pix
    gray = _channel_level(tl.load(base, mask=ok, other=0.0), mean, denom)
    if C == 3:
        green = _channel_level(tl.load(base + HW, mask=ok, other=0.0), mean, denom)
        blue = _channel_level(tl.load(base + 2 * HW, mask=ok, other=0.0), mean, denom)
        gray = (19595 * gray + 38470 * green + 7471 * blue + 0x8000) >> 16
    tl.store(out_ptr + image * HW + pix, gray.to(tl.uint8), mask=ok)


def _stats(responses: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 2] float64 (mean, population std + 1e-5) of each image."""
    n = responses.shape[0]
    chw = responses[0].numel()
    block, n_blocks = grid(chw, responses.device, _GPU_BLOCK)
    part = torch.empty((n, n_blocks, 2), dtype=torch.float64, device=responses.device)
    _moments_kernel[(n * n_blocks,)](responses, part, chw, n_blocks, BLOCK=block, num_warps=4)
    sums, m2 = part.unbind(dim=2)
    counts = torch.full((n_blocks,), block, dtype=torch.float64, device=responses.device)
    counts[-1] = chw - (n_blocks - 1) * block
    mean = sums.sum(dim=1) / chw
    m2 = m2.sum(dim=1) + (counts * (sums / counts - mean[:, None]) ** 2).sum(dim=1)
    return torch.stack([mean, (m2 / chw).sqrt() + 1e-5], dim=1).contiguous()


def response_image(responses: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] float32/float64 responses (C = 1 or 3) -> [N, H, W] uint8 gray images."""
    n, c, h, w = responses.shape
    block, n_blocks = grid(h * w, responses.device, _GPU_BLOCK)
    out = torch.empty((n, h, w), dtype=torch.uint8, device=responses.device)
    _gray_kernel[(n * n_blocks,)](
        responses, _stats(responses), out, h * w, n_blocks, C=c, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return out


def response_score(responses: torch.Tensor, footprint: np.ndarray) -> torch.Tensor:
    """[N, C, H, W] float responses -> [N] float64 mean local entropy of their gray images."""
    return mean_local_entropy(response_image(responses), footprint, None)
