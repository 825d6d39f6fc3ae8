"""The entropy score as a differentiable function of the images: the adaptive attacker's view.

The guided response (conv_max target) is piecewise constant in the image: its masks `f > 0`
and the max-pool and channel choices jump, so its gradient is zero almost everywhere. Here

- every ReLU's backward is `sigmoid(sharpness * f) * relu(R)` (the derivative of softplus
  with beta = sharpness in place of `f > 0`, as Dombrowski et al. 2019 smooth explanations;
  `R > 0` stays); the forward stays the model's, and so do the target and the choices;
- the max-pool routing and the target's channel choice are constants (BPDA, Athalye et al.
  2018);
- the response image is `response_to_image` without the truncation to uint8 (one channel:
  gray levels in [0, 255] whose floor is the image's; three: the luma of the untruncated
  channels), and its mean local entropy is `soft_mean_local_entropy`, whose histogram bins are
  soft.

As sharpness grows the response tends to the guided one, and as the bin width shrinks the
entropy tends to the exact op's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frmap.engine.responses.targets import target_indices
from frmap.engine.responses.tracing import OpCall, conv_max_op, trace_ops

# ITU-R 601-2 luma weights as PIL's Image.convert("L") scales them (`response_to_image`)
_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)


def smooth_guided_responses(net: nn.Module, x: torch.Tensor, sharpness: float) -> torch.Tensor:
    """`[N, C, H, W]` guided responses of the conv_max target, differentiable in `x`.

    The forward runs the model's ops (`frmap.engine.responses.tracing`) as they are, keeping
    each op's inputs; the backward walks them in reverse: at a ReLU
    `R_in = sigmoid(sharpness * f) * relu(R)`, elsewhere the op's vector-Jacobian product at
    its inputs held constant (linear ops do not depend on them, a max-pool routes by them),
    summed where a value fans out. So the result's own gradient is the true one of this
    smoothed response, with the routing fixed.

    Args:
        net: a model the reverse walk reads, e.g. `DigitsCNN` or a `Normalized` VGG.
        x: `[N, C, H, W]` images; where `x` requires grad, the responses carry its graph.
        sharpness: beta of the smoothed forward mask (larger: closer to guided, steeper).

    Raises:
        ValueError: the walk cannot read `net` (`Untraceable`), or `sharpness` is not
            positive.
    """
    traced = trace_ops(net)
    if not sharpness > 0:
        raise ValueError(f"sharpness must be positive, got {sharpness}")
    target = conv_max_op(traced.ops)
    ops = traced.ops[:target + 1]
    position = {op.node: i for i, op in enumerate(traced.ops)}
    calls = [None, *(OpCall(op, traced.module, position) for op in ops[1:])]
    with torch.enable_grad():
        env: list = [x, *([None] * target)]
        for i, op in enumerate(ops[1:], 1):
            env[i] = env[op.inputs[0]].clamp_min(0) if op.kind == "relu" else calls[i](env)
        h = env[target]
        grads: list = [None] * (target + 1)
        grads[target] = torch.zeros_like(h).scatter_(1, target_indices(h.detach(), None), 1.0)
        for i in range(target, 0, -1):
            r, op = grads[i], ops[i]
            if r is None or op.kind == "meta":
                continue
            if op.kind == "relu":
                f = env[op.inputs[0]]
                found = {op.inputs[0]: torch.sigmoid(sharpness * f) * r.clamp_min(0)}
            else:
                fixed = {j: env[j].detach().requires_grad_() for j in set(op.inputs)}
                out = calls[i](env, fixed)
                found = dict(zip(fixed, torch.autograd.grad(out, list(fixed.values()), r,
                                                            create_graph=True), strict=True))
            for j, g in found.items():
                grads[j] = g if grads[j] is None else grads[j] + g
    r = grads[0]
    return r if x.requires_grad else r.detach()


def soft_response_image(responses: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` responses, C = 1 or 3 -> `[N, H, W]` gray levels in [0, 255].

    `response_to_image` before its truncation to uint8: per image
    `clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0, 1) * 255`, three channels then weighted by
    the luma weights.
    """
    if responses.ndim != 4 or responses.shape[1] not in (1, 3):
        raise ValueError(f"responses must be [N, 1 or 3, H, W], got {tuple(responses.shape)}")
    mean = responses.mean((1, 2, 3), keepdim=True)
    # + 1e-30 under the root: a zero response keeps a finite gradient
    std = (responses - mean).square().mean((1, 2, 3), keepdim=True).add(1e-30).sqrt()
    gray = ((responses - mean) / (std + 1e-5) * 0.1 + 0.5).clamp(0, 1) * 255
    if gray.shape[1] == 1:
        return gray[:, 0]
    return torch.einsum("nchw,c->nhw", gray, gray.new_tensor(_LUMA))


def soft_mean_local_entropy(gray: torch.Tensor, footprint: np.ndarray | torch.Tensor, *,
                            width: float, levels: int = 256) -> torch.Tensor:
    """Mean local entropy (bits) with soft histogram bins, differentiable in `gray`.

    Bin k holds the gray levels [k, k + 1) (so a level's bin is its floor, as the uint8 image
    truncates). A pixel of level v belongs to bin k with weight
    `softmax_k(-(v - k - 0.5)^2 / (2 width^2))`; each window's histogram is the sum of its
    pixels' weights (a grouped convolution with the footprint; the window shrinks at the
    border, as `skimage.filters.rank.entropy`'s), `S = -sum_k p_k log2 p_k`, and the score the
    mean of `S` over the image. As `width` -> 0 it tends to `mean_local_entropy` of the floored
    image.

    Args:
        gray: `[N, H, W]` float gray levels in [0, levels).
        footprint: `[h, w]` 0/1 window, h and w odd, centred.
        width: the bins' Gaussian width, in gray levels (> 0).
        levels: the number of bins.

    Returns:
        `[N]` the scores, in `gray`'s dtype.
    """
    fp = torch.as_tensor(np.asarray(footprint), dtype=gray.dtype, device=gray.device)
    if fp.ndim != 2 or fp.shape[0] % 2 == 0 or fp.shape[1] % 2 == 0:
        raise ValueError(f"the footprint must be 2-D with odd sides, got {tuple(fp.shape)}")
    if gray.ndim != 3 or not width > 0 or levels < 1:
        raise ValueError("need [N, H, W] gray levels, width > 0 and levels >= 1")
    centres = torch.arange(levels, dtype=gray.dtype, device=gray.device) + 0.5
    weight = torch.softmax(-(gray[:, None] - centres[:, None, None]).square()
                           / (2 * width ** 2), 1)
    padding = (fp.shape[0] // 2, fp.shape[1] // 2)
    kernel = (fp != 0).to(gray.dtype)[None, None]
    counts = F.conv2d(weight, kernel.expand(levels, 1, -1, -1), padding=padding, groups=levels)
    size = F.conv2d(torch.ones_like(gray[:1, None]), kernel, padding=padding)
    p = counts / size
    # p log p with the log's argument kept off 0: no NaN where a bin is empty
    return -(p * torch.log2(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(1).mean((1, 2))
