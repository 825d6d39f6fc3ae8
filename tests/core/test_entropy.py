"""local_entropy / mean_local_entropy of numpy images on the C++ backend against scikit-image.

No torch here: these tests run in the core install too (numpy, the extension, scikit-image as the
oracle). The reference backend is scikit-image itself, so it is never tested against it.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import ball, disk

import frmap.kernels as K

from helpers import (
    ENTROPY_ATOL,
    FOOTPRINTS,
    FOOTPRINTS_3D,
    assert_close,
    entropy_cases,
    random_footprint,
    random_image,
    shifted_entropy_cases,
    skimage_rtol,
    smooth_image,
)

pytestmark = pytest.mark.needs_extension

# scikit-image is the oracle; frmap's own reference backend never is.
CPU_BACKENDS = ["cpu"]

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
    assert (interior == k).all(), np.unique(interior - k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("counts", "bits"),
    [((6, 3, 3), 1.5), ((2, 1, 1), 1.5), ((9, 9), 1.0), ((3,) * 8, 3.0), ((5,) * 4, 2.0),
     ((12, 6, 6), 1.5), ((1,) * 32, 5.0)],
)
def test_rational_entropies_are_exact(backend, counts, bits):
    """Windows whose entropy is a representable rational give it exactly (scikit-image too)."""
    values = np.repeat(np.arange(len(counts)) * 7, counts).astype(np.uint8)
    image = np.random.default_rng(len(counts)).permutation(values)[None, :]
    fp = np.ones((1, 2 * image.shape[1] - 1), np.uint8)  # every window holds the whole row
    got = K.local_entropy(image, fp, backend=backend)
    assert (got == bits).all(), np.unique(got - bits)
    assert (skimage_entropy(image, fp) == bits).all()
    volume = np.broadcast_to(values.reshape(1, -1, 1), (3, values.size, 2))
    got3 = K.local_entropy(volume, np.ones((1, 2 * values.size - 1, 3)), backend=backend)
    assert (got3 == bits).all()


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


def assert_like_skimage(actual, expected, footprint, what: str = "values") -> None:
    """Relative agreement with scikit-image within its own rounding (`skimage_rtol`)."""
    np.testing.assert_allclose(actual, expected, rtol=skimage_rtol(footprint), atol=0, err_msg=what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fp_name", list(FOOTPRINTS_3D))
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 9), (5, 7, 3), (9, 23, 26)])
def test_volumes_match_skimage(backend, fp_name, shape):
    """A 3-D footprint: [D, H, W] volumes, and a batch of them with a mask, as scikit-image."""
    rng = np.random.default_rng([sum(map(ord, fp_name)), *shape])
    fp = FOOTPRINTS_3D[fp_name]
    for dtype, high in ((np.uint8, 256), (np.uint8, 5), (np.uint16, 700)):
        volumes = random_image(rng, (2, *shape), dtype, high)
        mask = rng.random(shape) < 0.7
        got = K.local_entropy(volumes, fp, mask=mask, backend=backend)
        with warnings.catch_warnings():  # uint16: scikit-image warns that it is slow
            warnings.simplefilter("ignore")
            expected = np.stack([skimage_entropy(v, fp, mask=mask) for v in volumes])
        assert got.shape == volumes.shape
        assert_like_skimage(got, expected, fp, f"{fp_name} {shape} high={high}")
        means = K.mean_local_entropy(volumes, fp, mask=mask, backend=backend)
        assert means.shape == (2,)
        np.testing.assert_allclose(means, expected.mean(axis=(1, 2, 3)), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:Possible precision loss", "ignore:Downcasting")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "dtype", [np.int8, np.int16, np.int32, np.uint32, np.float16, np.float32, np.float64, bool]
)
@pytest.mark.parametrize("ndim", [2, 3])
def test_other_dtypes_converted_as_skimage(backend, dtype, ndim):
    """Float, signed, wide and bool inputs: scikit-image's conversion and result."""
    rng = np.random.default_rng([ndim, np.dtype(dtype).num])
    shape, fp = ((21, 19), disk(2)) if ndim == 2 else ((5, 9, 8), ball(1))
    kind = np.dtype(dtype).kind
    if kind == "f":
        images = [rng.random(shape).astype(dtype), (rng.random(shape) * 2 - 1).astype(dtype)]
    elif kind == "b":
        images = [rng.random(shape) < 0.5]
    else:
        info = np.iinfo(dtype)
        small = rng.integers(max(info.min, -50), 200, shape).astype(dtype)
        images = [small, rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)]
    for image in images:
        if kind == "b" and ndim == 2:
            with pytest.raises(ValueError, match="bool"):
                skimage_entropy(image, fp)
            with pytest.raises(ValueError, match="bool with a 2-D footprint"):
                K.local_entropy(image, fp, backend=backend)
            continue
        expected = skimage_entropy(image, fp)
        with pytest.warns(UserWarning, match="Possible precision loss"):
            got = K.local_entropy(image, fp, backend=backend)
        assert_like_skimage(got, expected, fp, f"{np.dtype(dtype)}")
        if importlib.util.find_spec("torch") is not None:  # absent in the core install
            import torch

            tensor = torch.from_numpy(np.asarray(image))
            got = K.local_entropy(tensor, fp, backend=backend)
            assert_like_skimage(got.numpy(), expected, fp, f"torch {np.dtype(dtype)}")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int64, np.uint32, np.uint64,
                                   np.float16, np.float32, np.float64, bool])
def test_img_as_ubyte_matches_skimage(dtype):
    from skimage.util import img_as_ubyte

    from frmap.kernels._rank_input import img_as_ubyte as ours

    rng = np.random.default_rng(np.dtype(dtype).num)
    kind = np.dtype(dtype).kind
    if kind == "f":
        samples = [rng.random(500) * 2 - 1, np.array([-1.0, 0.0, 1 / 510, 0.5, 1.0])]
    elif kind == "b":
        samples = [rng.random(500) < 0.5]
    else:
        info = np.iinfo(dtype)
        samples = [rng.integers(info.min, info.max, 500, endpoint=True, dtype=dtype),
                   rng.integers(0, 256, 500).astype(dtype), np.array([info.min, 0, info.max])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in samples:
            x = x.astype(dtype)
            np.testing.assert_array_equal(ours(x), img_as_ubyte(x), err_msg=str(x.dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shifts_match_skimage(backend):
    """Every admissible shift of an even and an odd footprint, 2-D and 3-D."""
    rng = np.random.default_rng(4)
    image = random_image(rng, (17, 19), np.uint8, 6)
    for fp in (random_footprint(rng, (4, 5)), disk(1)):
        h, w = fp.shape
        for sy in range(-(h // 2), h - h // 2):
            for sx in range(-(w // 2), w - w // 2):
                got = K.local_entropy(image, fp, shift_x=sx, shift_y=sy, backend=backend)
                expected = skimage_entropy(image, fp, shift_x=sx, shift_y=sy)
                assert_like_skimage(got, expected, fp, f"shift_x={sx} shift_y={sy}")
    volume = random_image(rng, (6, 9, 10), np.uint8, 6)
    fp = random_footprint(rng, (2, 3, 4))
    for sx, sy, sz in itertools.product((-1, 0), (-1, 0, 1), (-2, 1)):
        shifts = {"shift_x": sx, "shift_y": sy, "shift_z": sz}
        got = K.local_entropy(volume, fp, backend=backend, **shifts)
        assert_like_skimage(got, skimage_entropy(volume, fp, **shifts), fp, str(shifts))


def test_cpu_volumes_do_not_depend_on_thread_count():
    pytest.importorskip("frmap.kernels.cpu._ext")
    rng = np.random.default_rng(3)
    volumes = random_image(rng, (3, 40, 33, 35), np.uint8, 12)
    runs = []
    for threads in (1, 2, None):
        K.set_num_threads(threads)
        runs.append((K.local_entropy(volumes, ball(2), backend="cpu"),
                     K.mean_local_entropy(volumes, ball(2), backend="cpu")))
    for maps, means in runs[1:]:
        np.testing.assert_array_equal(maps, runs[0][0])
        np.testing.assert_array_equal(means, runs[0][1])


@settings(max_examples=40, deadline=None)
@given(case=shifted_entropy_cases(ndim=3, max_size=9, max_footprint=4))
def test_property_volumes_and_shifts_match_skimage(case):
    volume, fp, mask, shifts = case
    expected = skimage_entropy(volume, fp, mask=mask, **shifts)
    got = K.local_entropy(volume, fp, mask=mask, backend="auto", **shifts)
    assert_like_skimage(got, expected, fp)
    mean = K.mean_local_entropy(volume, fp, mask=mask, backend="auto", **shifts)
    np.testing.assert_allclose(mean, expected.mean(), rtol=1e-12, atol=1e-15)


# uint8 levels -> other dtypes, as a caller might hold them (floats in [-1, 1], signed around 0)
RETYPE = {
    "float64": lambda x: x / 255.0,
    "float32": lambda x: (x / 127.5 - 1).astype(np.float32),
    "float16": lambda x: (x / 255).astype(np.float16),
    "int8": lambda x: (x.astype(np.int16) - 128).astype(np.int8),
    "int16": lambda x: (x.astype(np.int16) - 128) * 3,
    "uint32": lambda x: x.astype(np.uint32) * 2**24,
}


@pytest.mark.filterwarnings("ignore:Possible precision loss", "ignore:Downcasting")
@settings(max_examples=40, deadline=None)
@given(case=shifted_entropy_cases(ndim=3, max_size=7, max_footprint=3),
       retype=st.sampled_from(sorted(RETYPE)), volume=st.booleans())
def test_property_other_dtypes_match_skimage(case, retype, volume):
    image, fp, mask, shifts = case
    image = RETYPE[retype](image)
    if not volume:  # the first plane, as an image, with the footprint's first plane
        image, fp, mask = image[0], fp[0], None if mask is None else mask[0]
        shifts = {"shift_x": shifts["shift_z"], "shift_y": shifts["shift_y"]}
    if not fp.any():
        fp = np.ones_like(fp)
    expected = skimage_entropy(image, fp, mask=mask, **shifts)
    got = K.local_entropy(image, fp, mask=mask, backend="auto", **shifts)
    assert_like_skimage(got, expected, fp, retype)


@settings(max_examples=40, deadline=None)
@given(case=shifted_entropy_cases(ndim=2, max_size=20, max_footprint=6))
def test_property_shifts_match_skimage(case):
    image, fp, mask, shifts = case
    expected = skimage_entropy(image, fp, mask=mask, **shifts)
    assert_like_skimage(K.local_entropy(image, fp, mask=mask, backend="auto", **shifts),
                        expected, fp)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": np.full((4, 4), 1.5)}, ValueError, "between -1 and 1"),
        ({"image": np.zeros((4, 4), bool)}, ValueError, "bool with a 2-D footprint"),
        ({"image": np.zeros((4, 4), np.complex64)}, TypeError, "bool, integer or float"),
        ({"image": np.zeros(4, np.uint8)}, ValueError, r"\[..., H, W\]"),
        ({"image": np.zeros(4, np.float64)}, ValueError, r"\[..., H, W\]"),
        ({"footprint": np.ones((3, 3, 3))}, ValueError, r"\[..., D, H, W\] for a 3-D footprint"),
        ({"shift_x": 2}, ValueError, "shift_x=2 moves the centre to 3"),
        ({"shift_y": -2}, ValueError, "shift_y=-2"),
        ({"shift_z": 1}, ValueError, "shift_z needs a 3-D footprint"),
        ({"image": np.zeros((0, 4), np.uint8)}, ValueError, "empty spatial shape"),
        ({"image": [[1, 2], [3, 4]]}, TypeError, "numpy array, a torch tensor or a DLPack array"),
        ({"footprint": np.zeros((3, 3))}, ValueError, "selects no pixel"),
        ({"footprint": np.full((3, 3), 2)}, ValueError, "binary"),
        ({"footprint": np.ones((3, 3, 1, 1))}, ValueError, "2-D or 3-D"),
        ({"mask": np.ones((5, 4), bool)}, ValueError, "mask shape"),
        ({"out": np.empty((4, 4), np.int32)}, TypeError, "float32 or float64"),
        ({"out": np.empty((4, 5))}, ValueError, "out must be"),
        ({"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
    ],
)
@pytest.mark.filterwarnings("ignore:Possible precision loss")
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
