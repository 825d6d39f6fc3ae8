"""Non-local means denoising of image batches, scikit-image's fast mode: `nl_means`."""

from __future__ import annotations

import numpy as np

from ._dispatch import implementation


def nl_means(images: np.ndarray, *, patch_size: int = 7, patch_distance: int = 11,
             h: float = 0.1, backend: str = "auto") -> np.ndarray:
    """Non-local means of every image of a batch, each exactly as scikit-image's
    `denoise_nl_means(image, patch_size, patch_distance, h, fast_mode=True, sigma=0)` with the
    channels as `channel_axis` (colour images are denoised jointly).

    Args:
        images: [N, C, H, W] float32 or float64 numpy array.
        patch_size: side of the compared patches (an even side is made odd, as scikit-image
            does).
        patch_distance: the search radius in pixels.
        h: the cut-off distance, in the images' units.
        backend: "auto" (the C++ kernels, where built: small images vectorised across
            images, equal to the last bit), "cpu" or
            "reference" (scikit-image, one call per image).

    Returns:
        [N, C, H, W] of the images' dtype.

    Raises:
        TypeError: images that are not a float32/float64 numpy array.
        ValueError: a bad shape or setting.
    """
    if not isinstance(images, np.ndarray) or images.dtype not in (np.float32, np.float64):
        raise TypeError(f"images must be a float32 or float64 numpy array, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"images must have a non-empty shape [N, C, H, W], got {images.shape}")
    for name, value in (("patch_size", patch_size), ("patch_distance", patch_distance)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h!r}")
    _, module = implementation("denoise", backend, images)
    return module.nl_means(images, patch_size, patch_distance, float(h))
