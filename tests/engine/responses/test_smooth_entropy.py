"""The differentiable entropy score: soft-histogram entropy against scikit-image, gradients
against finite differences, smoothed responses against the guided ones, and the attacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.filters.rank import entropy
from torch import nn

from frmap.engine.data import parse_footprint
from frmap.engine.detectors import EntropyDetector
from frmap.engine.evaluation.adaptive import (
    AdaptiveConfig,
    adaptive_pgd,
    entropy_surrogate,
    standardised,
)
from frmap.engine.models.digits import load_digits_model, load_digits_split
from frmap.engine.responses import ResponseEngine
from frmap.engine.responses.smooth import (
    smooth_guided_responses,
    soft_mean_local_entropy,
    soft_response_image,
)
from frmap.kernels import response_to_image

ASYMMETRIC = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], np.uint8)


def _levels(images: np.ndarray, seed: int) -> torch.Tensor:
    """Float gray levels whose floor is `images`, kept off the bin edges."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(images + rng.uniform(0.2, 0.8, images.shape))


@pytest.mark.parametrize("footprint", [parse_footprint("square3"), parse_footprint("disk2"),
                                       ASYMMETRIC], ids=["square3", "disk2", "asymmetric"])
def test_soft_entropy_tends_to_skimage_as_the_bins_narrow(footprint):
    images = np.random.default_rng(0).integers(0, 12, (3, 17, 23)).astype(np.uint8)
    expected = np.array([entropy(i, footprint).mean() for i in images])
    gray = _levels(images, 1)
    errors = [np.abs(soft_mean_local_entropy(gray, footprint, width=w).numpy() - expected).max()
              for w in (1.0, 0.3, 0.1)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


@pytest.mark.parametrize("shape", [(2, 2), (1, 9), (9, 1)])
def test_soft_entropy_edges(shape):
    """Images smaller than the window, 1xN, and a constant image (0 bits)."""
    footprint = parse_footprint("square5")
    images = np.random.default_rng(2).integers(0, 256, (2, *shape)).astype(np.uint8)
    expected = [entropy(i, footprint).mean() for i in images]
    got = soft_mean_local_entropy(_levels(images, 3), footprint, width=0.05).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)
    flat = torch.full((1, 6, 6), 127.5, dtype=torch.float64)
    assert soft_mean_local_entropy(flat, footprint, width=0.05).item() == pytest.approx(0, abs=1e-9)


def test_soft_entropy_gradient_matches_finite_differences():
    gray = torch.rand(2, 4, 5, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0)) * 8
    gray.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g: soft_mean_local_entropy(g, ASYMMETRIC, width=0.7, levels=8), (gray,))


def test_bad_footprints_and_widths_raise():
    gray = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        soft_mean_local_entropy(gray, np.ones((2, 3)), width=1.0)
    with pytest.raises(ValueError, match="width"):
        soft_mean_local_entropy(gray, np.ones((3, 3)), width=0.0)


def test_smooth_response_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()).double()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: smooth_guided_responses(net, v, 3.0), (x,))


@pytest.fixture(scope="module")
def digits(module_one_thread):
    model = load_digits_model().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_digits_split("test")
    return model, test.images[:24], test.labels[:24]


def test_smooth_responses_tend_to_the_guided_ones(digits):
    model, x, _ = digits
    guided = ResponseEngine(model, preprocess=None).responses(x)
    errors = [float((smooth_guided_responses(model, x, s) - guided).norm() / guided.norm())
              for s in (10.0, 1e3, 1e6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4
    gray = soft_response_image(smooth_guided_responses(model, x, 1e9).double())
    assert torch.equal(gray.floor(), response_to_image(guided.double()).double())


def test_soft_response_image_weighs_colours_like_pil():
    responses = np.random.default_rng(0).standard_normal((2, 3, 6, 7))
    mean = responses.mean((1, 2, 3), keepdims=True)
    std = responses.std((1, 2, 3), keepdims=True)
    rgb = (np.clip((responses - mean) / (std + 1e-5) * 0.1 + 0.5, 0, 1) * 255).astype(np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(np.moveaxis(c, 0, -1)).convert("L")) for c in rgb])
    # PIL rounds the luma of the truncated channels, the soft image weighs them untruncated:
    # soft - pil lies in [-0.5, 1.5), about 0.5 on average
    gap = soft_response_image(torch.from_numpy(responses)).numpy() - pil
    assert gap.min() >= -0.5 and gap.max() < 1.5
    assert abs(gap.mean() - 0.5) < 0.2


def test_entropy_surrogate_tracks_and_lowers_the_exact_score(digits):
    model, x, y = digits
    footprint = parse_footprint("square3")
    engine = ResponseEngine(model, preprocess=None)
    surrogate = entropy_surrogate(model, EntropyDetector("square3", "guided", "conv_max", ""))
    exact = engine.scores(x, footprint).numpy()
    with torch.no_grad():
        assert np.corrcoef(surrogate(x).numpy(), exact)[0, 1] > 0.9
    config = AdaptiveConfig(epsilon=0.1, steps=10, step=0.02)
    plain, plain_found = adaptive_pgd(model, None, x[:12], y[:12], config)
    adaptive, found = adaptive_pgd(model, standardised(surrogate, x), x[:12], y[:12], config)
    both = plain_found & found
    assert both.sum() >= 4
    assert engine.scores(adaptive[both], footprint).mean() < \
        engine.scores(plain[both], footprint).mean()


def test_entropy_surrogate_needs_the_papers_rule_and_target(digits):
    with pytest.raises(ValueError, match="guided"):
        entropy_surrogate(digits[0], EntropyDetector("square3", "deconvnet", "conv_max", ""))
