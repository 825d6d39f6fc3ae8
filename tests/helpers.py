"""Shared test factories, tolerances and assertions."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Absolute tolerance of the entropy (bits) by output dtype.
ENTROPY_ATOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}


def random_image(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.uint8, high=None):
    """Uniform random integers in [0, high) (default: the dtype's full range)."""
    high = high if high is not None else np.iinfo(dtype).max + 1
    return rng.integers(0, high, size=shape, dtype=np.int64).astype(dtype)


def smooth_image(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 3.0):
    """Gaussian-filtered noise stretched to the full uint8 range: few levels per window."""
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    return (x * 255).astype(np.uint8)


def random_footprint(rng: np.random.Generator, shape: tuple[int, int], p: float = 0.6):
    """An irregular binary footprint with at least one element set."""
    fp = rng.random(shape) < p
    fp.flat[rng.integers(fp.size)] = True
    return fp


def assert_close(actual, expected, atol: float, what: str = "values") -> None:
    """assert_allclose that says how many and which elements differ."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~np.isclose(actual, expected, rtol=0, atol=atol)
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        worst = float(np.abs(actual - expected).max())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} differ by more than {atol} "
            f"(max {worst:.3g}); first at {idx}"
        )
