"""Non-local means: the C++ kernels against scikit-image's `denoise_nl_means` (fast mode)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.restoration import denoise_nl_means

from frmap.kernels import nl_means


def _skimage(images: np.ndarray, patch_size: int, patch_distance: int, h: float) -> np.ndarray:
    """scikit-image on each image: a single channel as a gray image, colour jointly."""
    out = []
    for x in images:
        if len(x) == 1:
            out.append(denoise_nl_means(x[0], patch_size, patch_distance, h, fast_mode=True)[None])
        else:
            out.append(np.moveaxis(denoise_nl_means(np.moveaxis(x, 0, -1), patch_size,
                                                    patch_distance, h, fast_mode=True,
                                                    channel_axis=-1), -1, 0))
    return np.stack(out)


@pytest.mark.needs_extension
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "patch_size", "patch_distance", "h"), [
    ((6, 1, 8, 8), 3, 6, 2 / 255),     # the digits' squeezer: the padding exceeds the image
    ((19, 1, 12, 12), 3, 6, 2 / 255),  # groups of 8 (AVX-512), 4 or 2 images, the last short
    ((9, 2, 9, 10), 3, 4, 0.08),       # two channels in groups
    ((3, 3, 16, 16), 3, 5, 4 / 255),   # the ImageNet squeezer's settings
    ((2, 3, 20, 17), 4, 3, 0.05),      # an even patch (made odd), a non-square image
    ((2, 2, 5, 7), 7, 11, 0.1),        # two channels, patches larger than the image
    ((1, 1, 2, 3), 3, 2, 0.1),         # smaller than a patch
])
def test_equals_scikit_image(dtype, shape, patch_size, patch_distance, h):
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape).astype(dtype)
    x[0, :, : shape[2] // 2] = 0.5  # a flat region: many patches at distance 0
    got = nl_means(x, patch_size=patch_size, patch_distance=patch_distance, h=h, backend="cpu")
    assert got.dtype == dtype and got.shape == shape
    # the same arithmetic in the same order: equal to the last bit
    np.testing.assert_array_equal(got, _skimage(x, patch_size, patch_distance, h))
    # each image alone (one lane, no group) gives the same bits
    np.testing.assert_array_equal(
        np.concatenate([nl_means(x[i:i + 1], patch_size=patch_size,
                                 patch_distance=patch_distance, h=h, backend="cpu")
                        for i in range(len(x))]), got)
    np.testing.assert_array_equal(
        nl_means(x, patch_size=patch_size, patch_distance=patch_distance, h=h,
                 backend="reference"), got)


@pytest.mark.parametrize(("images", "kwargs", "error", "match"), [
    (np.zeros((2, 1, 4, 4), np.uint8), {}, TypeError, "float32 or float64"),
    ([[0.0]], {}, TypeError, "numpy array"),
    (np.zeros((1, 4, 4)), {}, ValueError, r"\[N, C, H, W\]"),
    (np.zeros((0, 1, 4, 4)), {}, ValueError, "non-empty"),
    (np.zeros((1, 1, 4, 4)), {"patch_size": 0}, ValueError, "patch_size"),
    (np.zeros((1, 1, 4, 4)), {"patch_distance": 1.5}, ValueError, "patch_distance"),
    (np.zeros((1, 1, 4, 4)), {"h": 0.0}, ValueError, "h must be > 0"),
    (np.zeros((1, 1, 4, 4)), {"backend": "triton"}, ValueError, "unknown backend"),
])
def test_bad_input(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        nl_means(images, **kwargs)
