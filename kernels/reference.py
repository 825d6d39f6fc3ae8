"""Readable oracles for every backend: scikit-image for the entropy, numpy and PIL for the image.

Each function takes already validated numpy arrays (see `frmap.kernels.entropy` and
`frmap.kernels.scoring` for the contracts) and computes in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image
from skimage.filters.rank import entropy as _skimage_entropy
from skimage.restoration import denoise_nl_means


def local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None, out_dtype: np.dtype
) -> np.ndarray:
    """[N, H, W] images or [N, D, H, W] volumes (uint8/uint16) -> local entropy in bits of the
    same shape, one skimage call per image or volume."""
    out = np.empty(images.shape, dtype=out_dtype)
    with warnings.catch_warnings():
        # skimage warns that many uint16 bins are slow; the oracle does not care.
        warnings.filterwarnings("ignore", message="Bad rank filter performance")
        for i, image in enumerate(images):
            # scikit-image needs writeable buffers (it fails on read-only views).
            m = None if mask is None else np.require(mask[i], requirements="W")
            out[i] = _skimage_entropy(np.require(image, requirements="W"), footprint, mask=m)
    return out


def mean_local_entropy(
    images: np.ndarray, footprint: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    """[N, H, W] or [N, D, H, W] -> [N] mean of each local-entropy map."""
    maps = local_entropy(images, footprint, mask, np.dtype(np.float64))
    return maps.mean(axis=tuple(range(1, maps.ndim)))


def nl_means(images: np.ndarray, patch_size: int, patch_distance: int, h: float) -> np.ndarray:
    """[N, C, H, W] -> scikit-image's `denoise_nl_means` (fast mode) of each image (one
    channel: as a gray image, since scikit-image squeezes a single channel away)."""
    def one(x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            return denoise_nl_means(x[0], patch_size, patch_distance, h, fast_mode=True)[None]
        return denoise_nl_means(x, patch_size, patch_distance, h, fast_mode=True,
                                channel_axis=0)
    return np.stack([one(x) for x in images]).astype(images.dtype)


def response_image(responses: np.ndarray) -> np.ndarray:
    """[N, C, H, W] float responses (C = 1 or 3) -> [N, H, W] uint8 grayscale images.

    Per image: standardise with the mean and population std over all channels and pixels,
    `(r - mean) / (std + 1e-5) * 0.1 + 0.5`, clip to [0, 1], x255, truncate to uint8;
    three channels then go to grayscale exactly as PIL's `convert("L")` does.
    """
    r = responses.astype(np.float64)
    mean = r.mean(axis=(1, 2, 3), keepdims=True)
    std = r.std(axis=(1, 2, 3), keepdims=True)
    rgb = (np.clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0.0, 1.0) * 255).astype(np.uint8)
    if rgb.shape[1] == 1:
        return rgb[:, 0]
    return np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0))).convert("L"))
         for x in rgb]
    )


def response_score(responses: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """[N, C, H, W] float responses -> [N] mean local entropy of their response images."""
    return mean_local_entropy(response_image(responses), footprint, None)
