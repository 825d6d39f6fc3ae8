"""response_to_image / response_score on the C++ backend against numpy + PIL + scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels._backend import _cpu_unavailable_reason

from helpers import assert_close

needs_cpu = pytest.mark.skipif(_cpu_unavailable_reason() is not None, reason="no C++ extension")


def random_responses(rng, n=3, c=3, h=21, w=17, dtype=np.float32):
    """Sparse, heavy-tailed maps like guided-backprop responses (many exact zeros)."""
    r = rng.standard_normal((n, c, h, w)) * (rng.random((n, c, h, w)) < 0.3)
    return (r * rng.exponential(1.0, (n, 1, 1, 1))).astype(dtype)


def boundary_cases(responses: np.ndarray, got: np.ndarray, expected: np.ndarray) -> int:
    """Count pixels where `got` differs from `expected`, asserting each is a rounding tie.

    A fast backend may land on the other side of an integer boundary only where the reference's
    pre-truncation value x*255 is within float rounding of an integer.
    """
    diff = got.astype(int) != expected.astype(int)
    if not diff.any():
        return 0
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    r = responses.astype(np.float64)
    mean = r.mean(axis=(1, 2, 3), keepdims=True)
    std = r.std(axis=(1, 2, 3), keepdims=True)
    scaled = np.clip((r - mean) / (std + 1e-5) * 0.1 + 0.5, 0, 1) * 255
    near = np.abs(scaled - np.round(scaled)) < 1e-6
    assert near.any(axis=1)[diff].all(), "a difference that is not a rounding tie"
    return int(diff.sum())


def test_reference_follows_method_step_4():
    """The reference, written out by hand for one RGB image, with PIL's own grayscale."""
    rng = np.random.default_rng(0)
    r = random_responses(rng, n=1)
    x = r[0].astype(np.float64)
    x = (x - x.mean()) / (x.std() + 1e-5) * 0.1 + 0.5
    rgb = (np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    gray = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))
    np.testing.assert_array_equal(K.response_to_image(r, backend="reference")[0], gray)


@needs_cpu
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_image_equals_reference(channels, dtype):
    rng = np.random.default_rng(channels)
    responses = random_responses(rng, n=6, c=channels, h=40, w=33, dtype=dtype)
    expected = K.response_to_image(responses, backend="reference")
    got = K.response_to_image(responses, backend="cpu")
    assert got.dtype == np.uint8 and got.shape == (6, 40, 33)
    ties = boundary_cases(responses, got, expected)
    assert ties <= got.size * 1e-3, f"{ties} rounding ties of {got.size} pixels"


@needs_cpu
def test_cpu_gray_conversion_matches_pil_on_all_levels():
    """Every RGB level combination that occurs goes to gray as PIL rounds it."""
    rng = np.random.default_rng(1)
    responses = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float64)
    got = K.response_to_image(responses, backend="cpu")
    expected = K.response_to_image(responses, backend="reference")
    assert boundary_cases(responses, got, expected) == 0
    assert len(np.unique(got)) > 40


@needs_cpu
def test_zero_response_is_flat_127_with_zero_score():
    zeros = np.zeros((2, 3, 8, 9), np.float32)
    for backend in ("reference", "cpu"):
        assert (K.response_to_image(zeros, backend=backend) == 127).all()
        assert (K.response_score(zeros, disk(1), backend=backend) == 0).all()


@needs_cpu
@pytest.mark.parametrize("footprint", [np.ones((3, 3)), disk(2), disk(3)])
def test_cpu_score_is_mean_entropy_of_its_image(footprint):
    rng = np.random.default_rng(4)
    responses = random_responses(rng, n=5, h=48, w=40)
    image = K.response_to_image(responses, backend="cpu")
    expected = np.array([skimage_entropy(x, footprint).mean() for x in image])
    got = K.response_score(responses, footprint, backend="cpu")
    assert_close(got, expected, 1e-9, "score vs skimage on the cpu image")
    reference = K.response_score(responses, footprint, backend="reference")
    ties = boundary_cases(responses, image, K.response_to_image(responses, backend="reference"))
    if ties == 0:
        assert_close(got, reference, 1e-9, "score vs reference")


@needs_cpu
def test_torch_and_half_inputs():
    rng = np.random.default_rng(9)
    responses = random_responses(rng, n=2, dtype=np.float16)
    expected = K.response_to_image(responses.astype(np.float32), backend="reference")
    got = K.response_to_image(torch.from_numpy(responses), backend="cpu")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)
    scores = K.response_score(torch.from_numpy(responses), disk(1))
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64


@pytest.mark.parametrize(
    ("responses", "error", "match"),
    [
        (np.zeros((2, 3, 4)), ValueError, r"\[N, C, H, W\]"),
        (np.zeros((1, 2, 4, 4)), ValueError, "1 or 3 channels, got 2"),
        (np.zeros((1, 3, 4, 4), np.int32), TypeError, "floating point, got int32"),
        (np.zeros((1, 3, 0, 4)), ValueError, "empty spatial shape"),
        (np.where(np.eye(4)[None, None] > 0, np.nan, 0.0), ValueError, "4 NaN or Inf .* \\[0\\]"),
        (np.full((2, 1, 3, 3), np.inf), ValueError, "18 NaN or Inf values \\(images \\[0, 1\\]"),
    ],
)
def test_bad_responses_raise_clear_errors(responses, error, match):
    with pytest.raises(error, match=match):
        K.response_score(responses, disk(1))
    with pytest.raises(error, match=match):
        K.response_to_image(responses)
