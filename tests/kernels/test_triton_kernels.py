"""The triton backend against the reference backend (scikit-image, numpy, PIL), via the public API.

Every test runs on CPU tensors through the Triton interpreter where TRITON_INTERPRET=1 (set by
conftest.py on machines without CUDA) and on CUDA tensors where a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels._backend import interpreting

from helpers import (
    ENTROPY_ATOL,
    FOOTPRINTS,
    assert_close,
    assert_levels_equal,
    entropy_cases,
    random_image,
    smooth_image,
    unrounded_levels,
)

DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.triton_interpret,
            pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1"),
        ],
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


# (1, 1) to (5, 3): images smaller than most footprints; (70, 75): several programs per image
# under the interpreter for footprints of 9 or more pixels.
SHAPES = [(1, 1), (1, 17), (13, 1), (5, 3), (31, 47), (70, 75)]


def reference_entropy(images: np.ndarray, footprint, mask=None) -> np.ndarray:
    return K.local_entropy(images, footprint, mask=mask, backend="reference")


def on(device: str, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp_name", list(FOOTPRINTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_local_entropy_uint8(device, fp_name, shape):
    rng = np.random.default_rng([list(FOOTPRINTS).index(fp_name), *shape])
    fp = FOOTPRINTS[fp_name]
    for high in (256, 5):  # full range, and few levels so windows repeat values
        images = random_image(rng, (2, *shape), np.uint8, high)
        got = K.local_entropy(on(device, images), fp, backend="triton")
        assert got.dtype == torch.float64 and got.device.type == device
        assert_close(got.cpu(), reference_entropy(images, fp), 1e-9, f"{fp_name} {shape} {high}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("high", [3, 1000, 65536])
def test_local_entropy_uint16(device, high):
    rng = np.random.default_rng(high)
    images = random_image(rng, (2, 23, 29), np.uint16, high)
    images[0, 0, 0] = high - 1
    for fp in (disk(2), np.ones((2, 3), bool)):
        got = K.local_entropy(on(device, images), fp, backend="triton")
        assert_close(got.cpu(), reference_entropy(images, fp), 1e-9, f"uint16 high={high}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("value", [0, 200])
def test_constant_image_is_exactly_zero(device, dtype, value):
    images = on(device, np.full((2, 9, 11), value, dtype))
    for fp in FOOTPRINTS.values():
        assert (K.local_entropy(images, fp, backend="triton") == 0).all()
        assert (K.mean_local_entropy(images, fp, backend="triton") == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["per_image", "spatial"])
def test_mask_and_batch(device, mask_kind):
    rng = np.random.default_rng(3)
    images = random_image(rng, (2, 3, 19, 23), np.uint8, 7)
    mask = rng.random(images.shape if mask_kind == "per_image" else images.shape[-2:]) < 0.6
    expected = reference_entropy(images, disk(2), mask)
    got = K.local_entropy(on(device, images), disk(2), mask=on(device, mask), backend="triton")
    assert got.shape == images.shape
    assert_close(got.cpu(), expected, 1e-9, f"{mask_kind} mask")
    means = K.mean_local_entropy(
        on(device, images), disk(2), mask=on(device, mask), backend="triton"
    )
    assert means.shape == (2, 3)
    assert_close(means.cpu(), expected.mean(axis=(-2, -1)), 1e-9, f"{mask_kind} mask means")


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_gives_zero(device):
    images = on(device, random_image(np.random.default_rng(0), (1, 6, 6)))
    mask = torch.zeros((6, 6), dtype=torch.bool, device=device)
    assert (K.local_entropy(images, disk(1), mask=mask, backend="triton") == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float32_out(device):
    images = random_image(np.random.default_rng(11), (3, 33, 29))
    out = torch.empty(images.shape, dtype=torch.float32, device=device)
    got = K.local_entropy(on(device, images), disk(3), out=out, backend="triton")
    assert got is out
    atol = ENTROPY_ATOL[np.dtype(np.float32)]
    assert_close(out.cpu(), reference_entropy(images, disk(3)), atol, "float32 out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp_name", ["disk1", "disk3", "even4x4", "one"])
def test_mean_local_entropy(device, fp_name):
    rng = np.random.default_rng(len(fp_name))
    images = np.stack([smooth_image(rng, (70, 75), sigma=2.0) for _ in range(3)])
    fp = FOOTPRINTS[fp_name]
    got = K.mean_local_entropy(on(device, images), fp, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert_close(got.cpu(), reference_entropy(images, fp).mean(axis=(1, 2)), 1e-9, fp_name)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = on(device, random_image(np.random.default_rng(5), (1, 24, 30)))
    view = base.transpose(1, 2)
    got = K.local_entropy(view, disk(2), backend="triton")
    assert_close(got.cpu(), reference_entropy(view.cpu().numpy(), disk(2)), 1e-9)


@pytest.mark.triton_interpret
@pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
@settings(max_examples=25, deadline=None)
@given(case=entropy_cases(max_size=20, max_footprint=6))
def test_property_matches_reference(case):
    image, fp, mask = case
    got = K.local_entropy(
        torch.from_numpy(image), fp, mask=None if mask is None else torch.from_numpy(mask),
        backend="triton",
    )
    assert_close(got, reference_entropy(image, fp, mask), 1e-9)


def random_responses(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Heavy-tailed responses: most pixels near zero, a few far out (clipped levels)."""
    return (rng.standard_normal(shape) * rng.exponential(1.0, shape) ** 2).astype(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_response_image(device, channels, dtype):
    rng = np.random.default_rng(channels)
    forgiven = 0
    for h, w in [(1, 1), (1, 9), (17, 23), (70, 75)]:
        responses = random_responses(rng, (2, channels, h, w), dtype)
        got = K.response_to_image(on(device, responses), backend="triton")
        assert got.dtype == torch.uint8 and got.shape == (2, h, w)
        expected = K.response_to_image(responses, backend="reference")
        forgiven += assert_levels_equal(got.cpu(), expected, unrounded_levels(responses))
    # A level within 1e-6 of an integer is rare (~1e-6 per value): expect (almost) none.
    assert forgiven <= 2, f"{forgiven} levels differ on a rounding boundary"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_zero_response_is_flat_127(device, channels):
    responses = torch.zeros((2, channels, 5, 7), device=device)
    assert (K.response_to_image(responses, backend="triton") == 127).all()
    assert (K.response_score(responses, disk(2), backend="triton") == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fp_name", ["disk2", "square3", "even4x4", "irregular"])
def test_response_score(device, channels, fp_name):
    rng = np.random.default_rng(channels + len(fp_name))
    responses = on(device, random_responses(rng, (3, channels, 40, 45), np.float32))
    fp = FOOTPRINTS[fp_name]
    got = K.response_score(responses, fp, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (3,)
    images = K.response_to_image(responses, backend="triton").cpu().numpy()
    expected = K.mean_local_entropy(images, fp, backend="reference")
    assert_close(got.cpu(), expected, 1e-9, f"response score {fp_name}")
