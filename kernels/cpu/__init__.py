"""The C++ CPU backend: allocates outputs, then calls the OpenMP kernels in `_ext`.

Inputs arrive validated and C-contiguous (see `frmap.kernels.entropy` / `.response`).
"""

from __future__ import annotations

import numpy as np

from .._backend import get_num_threads
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
