"""Shared test factories, tolerances and assertions."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st
from scipy import ndimage
from skimage.morphology import ball, diamond, disk

# Absolute tolerance of the entropy (bits) by output dtype.
ENTROPY_ATOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}


def skimage_rtol(footprint) -> float:
    """Relative tolerance of a float64 entropy against scikit-image's for this footprint.

    scikit-image adds one rounded term per level in the window, so its own error grows with the
    window: within its tests' 1e-15 up to ~32 pixels, 1.7e-15 against a long-double truth on
    ball(3) (123 pixels). frmap's C++ result is within about an ulp of that truth.
    """
    return 1e-15 * max(1.0, np.count_nonzero(footprint) / 32)


def random_image(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.uint8, high=None):
    """Uniform random integers in [0, high) (default: the dtype's full range)."""
    high = high if high is not None else np.iinfo(dtype).max + 1
    return rng.integers(0, high, size=shape, dtype=np.int64).astype(dtype)


def smooth_image(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 3.0):
    """Gaussian-filtered noise stretched to the full uint8 range: few levels per window."""
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    return (x * 255).astype(np.uint8)


def random_footprint(rng: np.random.Generator, shape: tuple[int, ...], p: float = 0.6):
    """An irregular binary footprint with at least one element set."""
    fp = rng.random(shape) < p
    fp.flat[rng.integers(fp.size)] = True
    return fp


def _entropy_case(h: int, w: int, fh: int, fw: int, levels: int, seed: int, masked: bool):
    rng = np.random.default_rng(seed)
    image = random_image(rng, (h, w), np.uint8, levels)
    footprint = random_footprint(rng, (fh, fw))
    mask = rng.random((h, w)) < 0.8 if masked else None
    return image, footprint, mask


def entropy_cases(max_size: int, max_footprint: int) -> st.SearchStrategy:
    """(image, footprint, mask or None): uint8 images of 1, 2, 4 or 256 levels up to
    `max_size` a side, irregular footprints up to `max_footprint`, masks leaving ~20% out."""
    return st.builds(
        _entropy_case, h=st.integers(1, max_size), w=st.integers(1, max_size),
        fh=st.integers(1, max_footprint), fw=st.integers(1, max_footprint),
        levels=st.sampled_from([1, 2, 4, 256]), seed=st.integers(0, 2**31 - 1),
        masked=st.booleans(),
    )


def _shifted_entropy_case(
    shape: tuple[int, ...], fp_shape: tuple[int, ...], levels: int, seed: int, masked: bool
):
    rng = np.random.default_rng(seed)
    image = random_image(rng, shape, np.uint8, levels)
    footprint = random_footprint(rng, fp_shape)
    mask = rng.random(shape) < 0.8 if masked else None
    # scikit-image's axes: 2-D (shift_y, shift_x) = (rows, columns); 3-D (x, y, z) = (d, h, w)
    names = ("shift_y", "shift_x") if len(fp_shape) == 2 else ("shift_x", "shift_y", "shift_z")
    bounds = [(-(f // 2), f - f // 2) for f in fp_shape]
    shifts = {n: int(rng.integers(*b)) for n, b in zip(names, bounds, strict=True)}
    return image, footprint, mask, shifts


def shifted_entropy_cases(ndim: int, max_size: int, max_footprint: int) -> st.SearchStrategy:
    """(image, footprint, mask or None, shifts): `ndim`-D uint8 images or volumes of 1, 2, 4 or
    256 levels, irregular footprints, and shifts anywhere inside the footprint."""
    return st.builds(
        _shifted_entropy_case,
        shape=st.tuples(*[st.integers(1, max_size)] * ndim),
        fp_shape=st.tuples(*[st.integers(1, max_footprint)] * ndim),
        levels=st.sampled_from([1, 2, 4, 256]), seed=st.integers(0, 2**31 - 1),
        masked=st.booleans(),
    )


FOOTPRINTS = {  # odd and even, thin, hollow, irregular, single-pixel
    "disk1": disk(1),
    "disk2": disk(2),
    "disk3": disk(3),
    "square3": np.ones((3, 3), np.uint8),
    "rect2x5": np.ones((2, 5), np.uint8),
    "rect5x1": np.ones((5, 1), np.uint8),
    "diamond2": diamond(2),
    "even4x4": np.ones((4, 4), bool),
    "one": np.ones((1, 1), np.uint8),
    "irregular": random_footprint(np.random.default_rng(7), (4, 5)),
    "ring": disk(3) - np.pad(disk(1), 2),
}

# More pixels than the Triton pairwise kernel takes (33 > 32) in few rows: its sliding kernel,
# cheaply under the interpreter
SLIDING = np.ones((3, 11), np.uint8)

FOOTPRINTS_3D = {  # ball, cube, flat, even, irregular
    "ball1": ball(1),
    "ball2": ball(2),
    "cube3": np.ones((3, 3, 3), np.uint8),
    "plane1x3x3": np.ones((1, 3, 3), bool),
    "even2x4x2": np.ones((2, 4, 2), np.uint8),
    "irregular": random_footprint(np.random.default_rng(8), (3, 4, 5)),
}


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


def assert_identical(actual, expected, what: str = "values") -> None:
    """Exact equality of two torch tensors (for ops that only select values) that says how many
    and which elements differ."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = actual.double() != expected.double()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ; first at {idx}")


def unrounded_levels(responses: np.ndarray) -> np.ndarray:
    """[N, C, H, W] responses -> METHOD step 4's float64 levels before truncation to uint8."""
    r = responses.astype(np.float64)
    mean = r.mean(axis=(1, 2, 3), keepdims=True)
    std = r.std(axis=(1, 2, 3), keepdims=True)
    return np.clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0.0, 1.0) * 255


def assert_levels_equal(actual, expected, unrounded: np.ndarray, atol: float = 1e-6) -> int:
    """Compare [N, H, W] uint8 response images exactly, except where rounding may flip a level.

    A pixel may differ by one gray level only where one of its channels' `unrounded` levels
    ([N, C, H, W]) lies within `atol` of an integer, so that float rounding can truncate it
    either way. Returns how many pixels differ that way.
    """
    actual, expected = np.asarray(actual, np.int64), np.asarray(expected, np.int64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    on_boundary = (np.abs(unrounded - np.round(unrounded)) <= atol).any(axis=1)
    differ = actual != expected
    bad = differ & ~(on_boundary & (np.abs(actual - expected) == 1))
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} levels differ away from a rounding boundary; "
            f"first at {idx}: {actual[bad][:5].tolist()} != {expected[bad][:5].tolist()}"
        )
    return int(differ.sum())


def direct_squeeze_scores(model, images, squeezer) -> np.ndarray:
    """Feature squeezing's score computed directly: each squeezed copy through `model` on its
    own, `max_s || softmax(model(x)) - softmax(model(s(x))) ||_1` in float64."""
    import torch

    with torch.no_grad():
        p = model(images).double().softmax(1)
        return torch.stack([(p - model(s).double().softmax(1)).abs().sum(1)
                            for s in squeezer.squeeze(images).values()]).amax(0).numpy()


def screen_pass(model, images, *detectors, batch_size: int = 64):
    """The pass a screener of `detectors` makes over `images` (`PassRunner`, no preprocessing)."""
    from frmap.engine.detectors.screen_pass import Needs, PassRunner

    needs = Needs.union([d.needs for d in detectors])
    return PassRunner(model, model, needs, preprocess=None, batch_size=batch_size).run(images)


class DLPackArray:
    """An array known only through DLPack, without a namespace to build a result with."""

    def __init__(self, data) -> None:
        self.data = data

    def __dlpack__(self, **kwargs):
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


class NamespacedArray(DLPackArray):
    """An array known only through DLPack and its namespace, as a CuPy or JAX array is: its
    data is imported by `importer` (np.from_dlpack, torch.from_dlpack)."""

    def __init__(self, data, importer: Callable) -> None:
        super().__init__(data)
        self.importer = importer

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(
            from_dlpack=lambda x: NamespacedArray(self.importer(x), self.importer))


def frmap(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m frmap.engine.cli ARGS` in a fresh process, its output captured as text; `env`
    adds to this process's environment."""
    return subprocess.run([sys.executable, "-m", "frmap.engine.cli", *args], capture_output=True,
                          text=True, input=stdin, timeout=timeout,
                          env={**os.environ, **(env or {})})


def digits_split(name: str):
    """(images, labels) of the embedded digits split `name`."""
    from frmap.engine.models.digits import load_digits_split

    split = load_digits_split(name)
    return split.images, split.labels


def layer_features(layers: dict[str, np.ndarray], predicted: np.ndarray, classes: int):
    """`Features` of the given layers whose logits predict `predicted` (5 for that class, else
    0)."""
    from frmap.engine.detectors.features import Features

    logits = np.eye(classes, dtype=np.float32)[predicted] * 5
    return Features({k: v.astype(np.float32) for k, v in layers.items()}, logits)
