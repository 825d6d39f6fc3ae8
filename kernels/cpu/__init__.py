"""The C++ CPU backend: allocates outputs, then calls the OpenMP kernels in `_ext`.

Inputs arrive validated and C-contiguous (see `frmap.kernels.entropy`, `.response`,
`.relu_rules` and `.pooling`); torch tensors are passed as numpy views of their memory.
"""

from __future__ import annotations

import numpy as np
import torch

from .._backend import get_num_threads
from ..relu_rules import RULE_CODES
from . import _ext


def local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None, out_dtype: np.dtype
) -> np.ndarray:
    out = np.empty(images.shape, dtype=out_dtype)
    _ext.local_entropy(images, footprint, mask, out, get_num_threads())
    return out


def mean_local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    out = np.empty(images.shape[0], dtype=np.float64)
    _ext.mean_local_entropy(images, footprint, mask, out, get_num_threads())
    return out


def response_image(responses: np.ndarray) -> np.ndarray:
    n, _, h, w = responses.shape
    out = np.empty((n, h, w), dtype=np.uint8)
    _ext.response_image(responses, out, get_num_threads())
    return out


def response_score(responses: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    out = np.empty(responses.shape[0], dtype=np.float64)
    _ext.response_score(responses, footprint, out, get_num_threads())
    return out


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


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
    """Pooled maxima into `y` and their window offsets into `offsets` (physical order)."""
    _ext.max_pool(_view(x), _view(y), _view(offsets), *kernel, channels_last, dead_first,
                  get_num_threads())


def max_unpool(r: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
               kernel: tuple[int, int], channels_last: bool) -> None:
    """`r` routed to each window's offset in `out`, zeros elsewhere (physical order)."""
    _ext.max_unpool(_view(r), _view(offsets), _view(out), *kernel, channels_last,
                    get_num_threads())
