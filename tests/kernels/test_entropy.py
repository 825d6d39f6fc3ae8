"""local_entropy / mean_local_entropy on the reference and C++ backends against scikit-image."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels._backend import _cpu_unavailable_reason

from helpers import (
    ENTROPY_ATOL,
    FOOTPRINTS,
    assert_close,
    entropy_cases,
    random_image,
    smooth_image,
)

CPU_BACKENDS = [
    "reference",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            _cpu_unavailable_reason() is not None, reason="C++ extension not built"
        ),
    ),
]

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fp_name", list(FOOTPRINTS))
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (5, 3), (31, 47), (257, 263)])
def test_matches_skimage_uint8(backend, fp_name, shape):
    rng = np.random.default_rng([sum(map(ord, fp_name)), *shape])  # stable across processes
    fp = FOOTPRINTS[fp_name]
    for high in (256, 5):  # full range, and few levels so windows repeat values
        image = random_image(rng, shape, np.uint8, high)
        got = K.local_entropy(image, fp, backend=backend)
        assert got.dtype == np.float64 and got.shape == shape
        assert_close(got, skimage_entropy(image, fp), 1e-9, f"{fp_name} {shape} high={high}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("high", [3, 1000, 4096, 65536])
def test_matches_skimage_uint16(backend, high):
    rng = np.random.default_rng(high)
    shape = (9, 11) if high == 65536 else (40, 37)
    image = random_image(rng, shape, np.uint16, high)
    if high > 3:
        image[0, 0] = high - 1  # the largest value sets scikit-image's bin count
    for fp in (disk(2), np.ones((2, 3), bool)):
        with pytest.warns(UserWarning) if high > 1023 else _no_warning():
            expected = skimage_entropy(image, fp)
        assert_close(K.local_entropy(image, fp, backend=backend), expected, 1e-9)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["per_image", "spatial"])
def test_mask_and_batch(backend, mask_kind):
    rng = np.random.default_rng(3)
    images = random_image(rng, (2, 3, 19, 23), np.uint8, 7)
    mask_shape = images.shape if mask_kind == "per_image" else images.shape[-2:]
    mask = rng.random(mask_shape) < 0.6
    got = K.local_entropy(images, disk(2), mask=mask, backend=backend)
    assert_close(got, skimage_stack(images, disk(2), mask), 1e-9, "masked batch")
    means = K.mean_local_entropy(images, disk(2), mask=mask, backend=backend)
    assert means.shape == (2, 3)
    assert_close(means, skimage_stack(images, disk(2), mask).mean(axis=(-2, -1)), 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_gives_zero(backend):
    image = random_image(np.random.default_rng(0), (6, 6))
    got = K.local_entropy(image, disk(1), mask=np.zeros((6, 6), bool), backend=backend)
    assert (got == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_constant_image_is_exactly_zero(backend, dtype):
    image = np.full((2, 30, 40), 200, dtype)
    for fp in FOOTPRINTS.values():
        assert (K.local_entropy(image, fp, backend=backend) == 0).all()
        assert (K.mean_local_entropy(image, fp, backend=backend) == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8])
def test_equally_frequent_values_give_k_bits(backend, k):
    """A window holding 2**k values, each equally often, has exactly k bits."""
    period, repeats = 2**k, 3
    row = np.arange(period * 6, dtype=np.int64) % period
    image = np.tile(row * (255 // max(period - 1, 1)), (5, 1)).astype(np.uint8)
    fp = np.ones((1, period * repeats), np.uint8)
    got = K.local_entropy(image, fp, backend=backend)
    half = period * repeats // 2
    interior = got[:, half : image.shape[1] - (period * repeats - half - 1)]
    assert interior.size > 0
    assert (interior == k).all(), np.unique(interior - k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_out_and_torch_input(backend):
    rng = np.random.default_rng(11)
    image = random_image(rng, (3, 33, 29))
    expected = skimage_stack(image, disk(3))
    out = np.empty(image.shape, np.float32)
    got = K.local_entropy(image, disk(3), out=out, backend=backend)
    assert got is out
    assert_close(out, expected, ENTROPY_ATOL[np.dtype(np.float32)], "float32 out")
    t = K.local_entropy(torch.from_numpy(image), disk(3), backend=backend)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    assert_close(t.numpy(), expected, 1e-9, "torch input")
    out_t = torch.empty(image.shape, dtype=torch.float32)
    K.local_entropy(torch.from_numpy(image), disk(3), out=out_t, backend=backend)
    assert_close(out_t.numpy(), expected, 1e-5, "torch float32 out")
    scores = K.mean_local_entropy(torch.from_numpy(image), disk(3), backend=backend)
    assert isinstance(scores, torch.Tensor)
    assert_close(scores.numpy(), expected.mean(axis=(-2, -1)), 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend):
    rng = np.random.default_rng(5)
    base = random_image(rng, (40, 60))
    for view in (base.T, base[::2, 1::3], base[:, ::-1]):
        assert not view.flags.c_contiguous
        assert_close(
            K.local_entropy(view, disk(2), backend=backend), skimage_entropy(view, disk(2)), 1e-9
        )


def test_cpu_results_do_not_depend_on_thread_count():
    pytest.importorskip("frmap.kernels.cpu._ext")
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
    backend = "auto"  # the C++ kernel where it is built
    assert_close(K.local_entropy(image, fp, mask=mask, backend=backend), expected, 1e-9)
    assert_close(
        K.mean_local_entropy(image, fp, mask=mask, backend=backend), expected.mean(), 1e-9
    )


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
        ({"image": [[1, 2], [3, 4]]}, TypeError, "numpy array or a torch tensor"),
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


def test_explicit_backend_never_falls_back(monkeypatch):
    with pytest.raises(ValueError, match="cpu backend takes CPU data"):
        K.resolve_backend("cpu", on_cuda=True)
    # triton reads TRITON_INTERPRET when first imported: not inside the patched environment
    importlib.import_module("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton backend takes CUDA tensors"):
        K.resolve_backend("triton", on_cuda=False)
    assert K.resolve_backend("auto", on_cuda=True) == "triton"
