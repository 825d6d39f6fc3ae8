"""The C++ CPU backend: allocates outputs, then calls the OpenMP kernels in `_ext`.

Inputs arrive validated and C-contiguous (see `frmap.kernels.entropy`, `.response`,
`.relu_rules` and `.pooling`); torch tensors are passed as numpy views of their memory, and torch
is never imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import RULE_CODES
from .._threads import get_num_threads
from . import _ext

if TYPE_CHECKING:
    import torch


def _writeable(x: np.ndarray) -> np.ndarray:
    """`x`, or a copy where it is read-only: the bindings of the images and responses take
    writeable arrays only, although the kernels only read them."""
    return x if x.flags.writeable else x.copy()


def local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None, out_dtype: np.dtype
) -> np.ndarray:
    out = np.empty(images.shape, dtype=out_dtype)
    _ext.local_entropy(_writeable(images), footprint, mask, out, get_num_threads())
    return out


def mean_local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    out = np.empty(images.shape[0], dtype=np.float64)
    _ext.mean_local_entropy(_writeable(images), footprint, mask, out, get_num_threads())
    return out


def response_image(responses: np.ndarray) -> np.ndarray:
    n, _, h, w = responses.shape
    out = np.empty((n, h, w), dtype=np.uint8)
    _ext.response_image(_writeable(responses), out, get_num_threads())
    return out


def response_score(responses: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    out = np.empty(responses.shape[0], dtype=np.float64)
    _ext.response_score(_writeable(responses), footprint, out, get_num_threads())
    return out


def nl_means(images: np.ndarray, patch_size: int, patch_distance: int, h: float) -> np.ndarray:
    """[N, C, H, W] -> scikit-image's fast non-local means of each image (see
    `frmap.kernels.denoise`): padded here as scikit-image pads, denoised in C++."""
    s = patch_size + 1 - patch_size % 2  # odd, as scikit-image makes it
    pad = s // 2 + patch_distance + 1
    x = np.moveaxis(images, 1, -1)
    padded = np.ascontiguousarray(
        np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect"), dtype=np.float64)
    out = np.empty_like(padded)
    _ext.nl_means(padded, out, s, patch_distance, h, get_num_threads())
    return np.moveaxis(out[:, pad:-pad, pad:-pad], -1, 1).astype(images.dtype)


def _view(t: torch.Tensor, channels_last: bool = False) -> np.ndarray:
    """The numpy view of `t`'s memory; a 4-D channels-last tensor in memory order [N, H, W, C]."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).detach().numpy()


def relu_forward(x: torch.Tensor, y: torch.Tensor, bits: torch.Tensor | None) -> None:
    """y = relu(x) and, unless `bits` is None, bits = packed (x > 0); flat tensors, y may be x."""
    _ext.relu_forward(_view(x), _view(y), None if bits is None else _view(bits),
                      get_num_threads())


def relu_backward(g: torch.Tensor, bits: torch.Tensor | None, out: torch.Tensor, rule: str) -> None:
    """out = the rule's R_in from the signal `g` and the packed mask; flat, `out` may be `g`."""
    _ext.relu_backward(_view(g), None if bits is None else _view(bits), _view(out),
                       RULE_CODES[rule], get_num_threads())


def max_pool(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, kernel: tuple[int, int],
             channels_last: bool, dead_first: bool) -> None:
    """Pooled maxima into `y` and their window offsets into `offsets`."""
    _ext.max_pool(*(_view(t, channels_last) for t in (x, y, offsets)), *kernel, channels_last,
                  dead_first, get_num_threads())


def max_unpool(r: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
               kernel: tuple[int, int], channels_last: bool) -> None:
    """`r` routed to each window's offset in `out`, zeros elsewhere."""
    _ext.max_unpool(*(_view(t, channels_last) for t in (r, offsets, out)), *kernel,
                    channels_last, get_num_threads())
