"""local_entropy / mean_local_entropy of numpy images on the C++ backend against scikit-image.

No torch here: these tests run in the core install too (numpy, the extension, scikit-image as the
oracle). The reference backend is scikit-image itself, so it is never tested against it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K

from helpers import (
    ENTROPY_ATOL,
    FOOTPRINTS,
    assert_close,
    entropy_cases,
    random_image,
    smooth_image,
)

pytestmark = pytest.mark.needs_extension

FOOTPRINTS = {**FOOTPRINTS, "large9": disk(4)}


def skimage_stack(images, footprint, mask=None):
    """scikit-image on each [H, W] image of a [..., H, W] stack."""
    h, w = images.shape[-2:]
    flat = images.reshape(-1, h, w)
    masks = [None] * len(flat) if mask is None else np.broadcast_to(mask, images.shape).reshape(
        -1, h, w
    )
    out = [skimage_entropy(x, footprint, mask=m) for x, m in zip(flat, masks, strict=True)]
    return np.stack(out).reshape(images.shape)


@pytest.mark.parametrize("fp_name", list(FOOTPRINTS))
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (5, 3), (31, 47), (257, 263)])
def test_matches_skimage_uint8(fp_name, shape):
    rng = np.random.default_rng([sum(map(ord, fp_name)), *shape])  # stable across processes
    fp = FOOTPRINTS[fp_name]
    for high in (256, 5):  # full range, and few levels so windows repeat values
        image = random_image(rng, shape, np.uint8, high)
        got = K.local_entropy(image, fp, backend="cpu")
        assert got.dtype == np.float64 and got.shape == shape
        assert_close(got, skimage_entropy(image, fp), 1e-9, f"{fp_name} {shape} high={high}")


@pytest.mark.parametrize("high", [3, 1000, 4096, 65536])
def test_matches_skimage_uint16(high):
    rng = np.random.default_rng(high)
    shape = (9, 11) if high == 65536 else (40, 37)
    image = random_image(rng, shape, np.uint16, high)
    if high > 3:
        image[0, 0] = high - 1  # the largest value sets scikit-image's bin count
    for fp in (disk(2), np.ones((2, 3), bool)):
        with pytest.warns(UserWarning) if high > 1023 else _no_warning():
            expected = skimage_entropy(image, fp)
        assert_close(K.local_entropy(image, fp, backend="cpu"), expected, 1e-9)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mask_kind", ["per_image", "spatial"])
def test_mask_and_batch(mask_kind):
    rng = np.random.default_rng(3)
    images = random_image(rng, (2, 3, 19, 23), np.uint8, 7)
    mask_shape = images.shape if mask_kind == "per_image" else images.shape[-2:]
    mask = rng.random(mask_shape) < 0.6
    got = K.local_entropy(images, disk(2), mask=mask, backend="cpu")
    assert_close(got, skimage_stack(images, disk(2), mask), 1e-9, "masked batch")
    means = K.mean_local_entropy(images, disk(2), mask=mask, backend="cpu")
    assert means.shape == (2, 3)
    assert_close(means, skimage_stack(images, disk(2), mask).mean(axis=(-2, -1)), 1e-9)


def test_fully_masked_gives_zero():
    image = random_image(np.random.default_rng(0), (6, 6))
    got = K.local_entropy(image, disk(1), mask=np.zeros((6, 6), bool), backend="cpu")
    assert (got == 0).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_constant_image_is_exactly_zero(dtype):
    image = np.full((2, 30, 40), 200, dtype)
    for fp in FOOTPRINTS.values():
        assert (K.local_entropy(image, fp, backend="cpu") == 0).all()
        assert (K.mean_local_entropy(image, fp, backend="cpu") == 0).all()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8])
def test_equally_frequent_values_give_k_bits(k):
    """A window holding 2**k values, each equally often, has exactly k bits."""
    period, repeats = 2**k, 3
    row = np.arange(period * 6, dtype=np.int64) % period
    image = np.tile(row * (255 // max(period - 1, 1)), (5, 1)).astype(np.uint8)
    fp = np.ones((1, period * repeats), np.uint8)
    got = K.local_entropy(image, fp, backend="cpu")
    half = period * repeats // 2
    interior = got[:, half : image.shape[1] - (period * repeats - half - 1)]
    assert interior.size > 0
    np.testing.assert_allclose(interior, k, rtol=0, atol=1e-12)


def test_float32_out():
    rng = np.random.default_rng(11)
    image = random_image(rng, (3, 33, 29))
    out = np.empty(image.shape, np.float32)
    got = K.local_entropy(image, disk(3), out=out, backend="cpu")
    assert got is out
    assert_close(out, skimage_stack(image, disk(3)), ENTROPY_ATOL[np.dtype(np.float32)])


def test_non_contiguous_input():
    rng = np.random.default_rng(5)
    base = random_image(rng, (40, 60))
    for view in (base.T, base[::2, 1::3], base[:, ::-1]):
        assert not view.flags.c_contiguous
        assert_close(
            K.local_entropy(view, disk(2), backend="cpu"), skimage_entropy(view, disk(2)), 1e-9
        )


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(2)
    images = np.stack([smooth_image(rng, (64, 80)) for _ in range(5)])
    runs = []
    for threads in (1, 2, None):
        K.set_num_threads(threads)
        runs.append(
            (
                K.local_entropy(images, disk(3), backend="cpu"),
                K.mean_local_entropy(images, disk(3), backend="cpu"),
            )
        )
    for maps, means in runs[1:]:
        np.testing.assert_array_equal(maps, runs[0][0])
        np.testing.assert_array_equal(means, runs[0][1])


@settings(max_examples=60, deadline=None)
@given(case=entropy_cases(max_size=24, max_footprint=7))
def test_property_matches_skimage(case):
    image, fp, mask = case
    expected = skimage_entropy(image, fp, mask=mask)
    assert_close(K.local_entropy(image, fp, mask=mask, backend="cpu"), expected, 1e-9)
    assert_close(K.mean_local_entropy(image, fp, mask=mask, backend="cpu"), expected.mean(), 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": np.zeros((4, 4), np.float32)}, TypeError, "uint8 or uint16, got float32"),
        ({"image": np.zeros((4, 4), np.int8)}, TypeError, "got int8"),
        ({"image": np.zeros((4, 4), np.int32)}, TypeError, "got int32"),
        ({"image": np.zeros(4, np.uint8)}, ValueError, r"\[..., H, W\]"),
        ({"image": np.zeros((0, 4), np.uint8)}, ValueError, "empty spatial shape"),
        ({"image": [[1, 2], [3, 4]]}, TypeError, "numpy array or a torch tensor"),
        ({"footprint": np.zeros((3, 3))}, ValueError, "selects no pixel"),
        ({"footprint": np.full((3, 3), 2)}, ValueError, "binary"),
        ({"footprint": np.ones((3, 3, 1))}, ValueError, "2-D"),
        ({"mask": np.ones((5, 4), bool)}, ValueError, "mask shape"),
        ({"out": np.empty((4, 4), np.int32)}, TypeError, "float32 or float64"),
        ({"out": np.empty((4, 5))}, ValueError, "out must be"),
        ({"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    args = {"image": np.zeros((4, 4), np.uint8), "footprint": disk(1)} | kwargs
    image, footprint = args.pop("image"), args.pop("footprint")
    with pytest.raises(error, match=match):
        K.local_entropy(image, footprint, **args)


def test_read_only_input():
    """The kernels only read the image and the mask: read-only arrays work."""
    rng = np.random.default_rng(12)
    images = random_image(rng, (2, 21, 18))
    mask = rng.random((21, 18)) < 0.7
    expected = skimage_stack(images, disk(2), mask)  # scikit-image needs writeable arrays
    for a in (images, mask):
        a.flags.writeable = False
    assert_close(K.local_entropy(images, disk(2), mask=mask, backend="cpu"), expected, 1e-9)
    assert_close(K.mean_local_entropy(images, disk(2), mask=mask, backend="cpu"),
                 expected.mean(axis=(-2, -1)), 1e-9)


def test_auto_runs_the_cpu_backend_on_numpy():
    assert K.resolve_backend("auto", np.zeros((4, 4), np.uint8)) == "cpu"


def test_explicit_backend_unknown_to_the_family():
    with pytest.raises(ValueError, match="unknown backend 'torch'; choose one of auto, reference"):
        K.local_entropy(np.zeros((4, 4), np.uint8), disk(1), backend="torch")
