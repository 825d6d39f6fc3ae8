"""The triton backend against the reference backend (scikit-image, numpy, PIL), via the public API.

Every test runs on CUDA tensors where a GPU is present, else on CPU tensors through the Triton
interpreter (the `triton_device` fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from skimage.morphology import disk

import frmap.kernels as K

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

# (1, 1) to (5, 3): images smaller than most footprints; (70, 75): several programs per image
# under the interpreter for footprints of 9 or more pixels.
SHAPES = [(1, 1), (1, 17), (13, 1), (5, 3), (31, 47), (70, 75)]


def reference_entropy(images: np.ndarray, footprint, mask=None) -> np.ndarray:
    return K.local_entropy(images, footprint, mask=mask, backend="reference")


def on(device: str, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


@pytest.mark.parametrize("fp_name", list(FOOTPRINTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_local_entropy_uint8(triton_device, fp_name, shape):
    rng = np.random.default_rng([list(FOOTPRINTS).index(fp_name), *shape])
    fp = FOOTPRINTS[fp_name]
    for high in (256, 5):  # full range, and few levels so windows repeat values
        images = random_image(rng, (2, *shape), np.uint8, high)
        got = K.local_entropy(on(triton_device, images), fp, backend="triton")
        assert got.dtype == torch.float64 and got.device.type == triton_device
        assert_close(got.cpu(), reference_entropy(images, fp), 1e-9, f"{fp_name} {shape} {high}")


@pytest.mark.parametrize("high", [3, 1000, 65536])
def test_local_entropy_uint16(triton_device, high):
    rng = np.random.default_rng(high)
    images = random_image(rng, (2, 23, 29), np.uint16, high)
    images[0, 0, 0] = high - 1
    for fp in (disk(2), np.ones((2, 3), bool)):
        got = K.local_entropy(on(triton_device, images), fp, backend="triton")
        assert_close(got.cpu(), reference_entropy(images, fp), 1e-9, f"uint16 high={high}")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("value", [0, 200])
def test_constant_image_is_exactly_zero(triton_device, dtype, value):
    images = on(triton_device, np.full((2, 9, 11), value, dtype))
    for fp in FOOTPRINTS.values():
        assert (K.local_entropy(images, fp, backend="triton") == 0).all()
        assert (K.mean_local_entropy(images, fp, backend="triton") == 0).all()


@pytest.mark.parametrize("mask_kind", ["per_image", "spatial"])
def test_mask_and_batch(triton_device, mask_kind):
    rng = np.random.default_rng(3)
    images = random_image(rng, (2, 3, 19, 23), np.uint8, 7)
    mask = rng.random(images.shape if mask_kind == "per_image" else images.shape[-2:]) < 0.6
    expected = reference_entropy(images, disk(2), mask)
    got = K.local_entropy(on(triton_device, images), disk(2), mask=on(triton_device, mask),
                          backend="triton")
    assert got.shape == images.shape
    assert_close(got.cpu(), expected, 1e-9, f"{mask_kind} mask")
    means = K.mean_local_entropy(
        on(triton_device, images), disk(2), mask=on(triton_device, mask), backend="triton"
    )
    assert means.shape == (2, 3)
    assert_close(means.cpu(), expected.mean(axis=(-2, -1)), 1e-9, f"{mask_kind} mask means")


def test_fully_masked_gives_zero(triton_device):
    images = on(triton_device, random_image(np.random.default_rng(0), (1, 6, 6)))
    mask = torch.zeros((6, 6), dtype=torch.bool, device=triton_device)
    assert (K.local_entropy(images, disk(1), mask=mask, backend="triton") == 0).all()


def test_float32_out(triton_device):
    images = random_image(np.random.default_rng(11), (3, 33, 29))
    out = torch.empty(images.shape, dtype=torch.float32, device=triton_device)
    got = K.local_entropy(on(triton_device, images), disk(3), out=out, backend="triton")
    assert got is out
    atol = ENTROPY_ATOL[np.dtype(np.float32)]
    assert_close(out.cpu(), reference_entropy(images, disk(3)), atol, "float32 out")


@pytest.mark.parametrize("fp_name", ["disk1", "disk3", "even4x4", "one"])
def test_mean_local_entropy(triton_device, fp_name):
    rng = np.random.default_rng(len(fp_name))
    images = np.stack([smooth_image(rng, (70, 75), sigma=2.0) for _ in range(3)])
    fp = FOOTPRINTS[fp_name]
    got = K.mean_local_entropy(on(triton_device, images), fp, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert_close(got.cpu(), reference_entropy(images, fp).mean(axis=(1, 2)), 1e-9, fp_name)


def test_non_contiguous_input(triton_device):
    base = on(triton_device, random_image(np.random.default_rng(5), (1, 24, 30)))
    view = base.transpose(1, 2)
    got = K.local_entropy(view, disk(2), backend="triton")
    assert_close(got.cpu(), reference_entropy(view.cpu().numpy(), disk(2)), 1e-9)


# the fixture's device is the same for every example
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=entropy_cases(max_size=20, max_footprint=6))
def test_property_matches_reference(triton_device, case):
    image, fp, mask = case
    got = K.local_entropy(
        on(triton_device, image), fp, mask=None if mask is None else on(triton_device, mask),
        backend="triton",
    )
    assert_close(got.cpu(), reference_entropy(image, fp, mask), 1e-9)


def random_responses(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Heavy-tailed responses: most pixels near zero, a few far out (clipped levels)."""
    return (rng.standard_normal(shape) * rng.exponential(1.0, shape) ** 2).astype(dtype)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_response_image(triton_device, channels, dtype):
    rng = np.random.default_rng(channels)
    forgiven = 0
    for h, w in [(1, 1), (1, 9), (17, 23), (70, 75)]:
        responses = random_responses(rng, (2, channels, h, w), dtype)
        got = K.response_to_image(on(triton_device, responses), backend="triton")
        assert got.dtype == torch.uint8 and got.shape == (2, h, w)
        expected = K.response_to_image(responses, backend="reference")
        forgiven += assert_levels_equal(got.cpu(), expected, unrounded_levels(responses))
    # A level within 1e-6 of an integer is rare (~1e-6 per value): expect (almost) none.
    assert forgiven <= 2, f"{forgiven} levels differ on a rounding boundary"


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_response_is_flat_127(triton_device, channels):
    responses = torch.zeros((2, channels, 5, 7), device=triton_device)
    assert (K.response_to_image(responses, backend="triton") == 127).all()
    assert (K.response_score(responses, disk(2), backend="triton") == 0).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fp_name", ["disk2", "square3", "even4x4", "irregular"])
def test_response_score(triton_device, channels, fp_name):
    rng = np.random.default_rng(channels + len(fp_name))
    responses = on(triton_device, random_responses(rng, (3, channels, 40, 45), np.float32))
    fp = FOOTPRINTS[fp_name]
    got = K.response_score(responses, fp, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (3,)
    images = K.response_to_image(responses, backend="triton").cpu().numpy()
    expected = K.mean_local_entropy(images, fp, backend="reference")
    assert_close(got.cpu(), expected, 1e-9, f"response score {fp_name}")
