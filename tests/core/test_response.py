"""response_to_image / response_score of numpy responses on the C++ backend against numpy + PIL +
scikit-image (no torch here: these tests run in the core install too)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K

from helpers import assert_close, assert_levels_equal, unrounded_levels


def random_responses(rng, n=3, c=3, h=21, w=17, dtype=np.float32):
    """Sparse, heavy-tailed maps like guided-backprop responses (many exact zeros)."""
    r = rng.standard_normal((n, c, h, w)) * (rng.random((n, c, h, w)) < 0.3)
    return (r * rng.exponential(1.0, (n, 1, 1, 1))).astype(dtype)


def test_reference_follows_method_step_4():
    """The reference, written out by hand for one RGB image, with PIL's own grayscale."""
    rng = np.random.default_rng(0)
    r = random_responses(rng, n=1)
    x = r[0].astype(np.float64)
    x = (x - x.mean()) / (x.std() + 1e-5) * 0.1 + 0.5
    rgb = (np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    gray = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))
    np.testing.assert_array_equal(K.response_to_image(r, backend="reference")[0], gray)


@pytest.mark.needs_extension
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_image_equals_reference(channels, dtype):
    rng = np.random.default_rng(channels)
    responses = random_responses(rng, n=6, c=channels, h=40, w=33, dtype=dtype)
    expected = K.response_to_image(responses, backend="reference")
    got = K.response_to_image(responses, backend="cpu")
    assert got.dtype == np.uint8 and got.shape == (6, 40, 33)
    ties = assert_levels_equal(got, expected, unrounded_levels(responses))
    assert ties <= got.size * 1e-3, f"{ties} rounding ties of {got.size} pixels"


@pytest.mark.needs_extension
def test_cpu_gray_conversion_matches_pil_on_all_levels():
    """Every RGB level combination that occurs goes to gray as PIL rounds it."""
    rng = np.random.default_rng(1)
    responses = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float64)
    got = K.response_to_image(responses, backend="cpu")
    expected = K.response_to_image(responses, backend="reference")
    assert assert_levels_equal(got, expected, unrounded_levels(responses)) == 0
    assert len(np.unique(got)) > 40


@pytest.mark.needs_extension
def test_zero_response_is_flat_127_with_zero_score():
    zeros = np.zeros((2, 3, 8, 9), np.float32)
    for backend in ("reference", "cpu"):
        assert (K.response_to_image(zeros, backend=backend) == 127).all()
        assert (K.response_score(zeros, disk(1), backend=backend) == 0).all()


@pytest.mark.needs_extension
@pytest.mark.parametrize("footprint", [np.ones((3, 3)), disk(2), disk(3)])
def test_cpu_score_is_mean_entropy_of_its_image(footprint):
    rng = np.random.default_rng(4)
    responses = random_responses(rng, n=5, h=48, w=40)
    image = K.response_to_image(responses, backend="cpu")
    expected = np.array([skimage_entropy(x, footprint).mean() for x in image])
    got = K.response_score(responses, footprint, backend="cpu")
    assert_close(got, expected, 1e-9, "score vs skimage on the cpu image")
    reference = K.response_score(responses, footprint, backend="reference")
    ties = assert_levels_equal(image, K.response_to_image(responses, backend="reference"),
                               unrounded_levels(responses))
    if ties == 0:
        assert_close(got, reference, 1e-9, "score vs reference")


@pytest.mark.needs_extension
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_half_and_read_only_inputs(dtype):
    """float16 is computed as float32; read-only arrays work (the kernels only read them)."""
    responses = random_responses(np.random.default_rng(9), n=2, dtype=dtype)
    expected = K.response_to_image(responses.astype(np.float32), backend="reference")
    scores = np.array([skimage_entropy(x, disk(1)).mean() for x in expected])
    responses.flags.writeable = False
    got = K.response_to_image(responses, backend="cpu")
    assert_levels_equal(got, expected, unrounded_levels(responses.astype(np.float32)))
    if (got == expected).all():
        assert_close(K.response_score(responses, disk(1), backend="cpu"), scores, 1e-9)


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


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_finite_responses_whose_sum_overflows_are_scored(backend):
    """Finite values near float32's largest sum to inf: the check still accepts them, and the
    score is that of the same maps scaled down (the gray image is scale-free)."""
    responses = random_responses(np.random.default_rng(12), n=2).astype(np.float32)
    big = responses / np.abs(responses).max() * np.float32(3e38)
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(big.sum())
    expected = K.response_score(big.astype(np.float64) / 3e38, disk(1), backend="reference")
    assert_close(K.response_score(big, disk(1), backend=backend), expected, 1e-9)
