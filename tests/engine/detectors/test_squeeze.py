"""Feature squeezing: squeezers against numpy / scikit-image, the score on a known problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.restoration import denoise_nl_means
from torch import nn

from frmap.engine.detectors.squeeze import (
    DIGITS_SQUEEZERS,
    IMAGENET_SQUEEZERS,
    FeatureSqueezer,
    NLMeans,
    SqueezeConfig,
    median_smooth,
    nl_means_denoise,
    reduce_bit_depth,
)

from helpers import screen_pass


def _images(seed: int, shape=(3, 3, 12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bit_depth_is_the_nearest_level(bits):
    x = _images(bits)
    levels = np.arange(2**bits) / (2**bits - 1)
    expected = levels[np.abs(x[..., None] - levels).argmin(-1)]
    got = reduce_bit_depth(torch.from_numpy(x), bits)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    # ties go to the even level, as numpy's rint
    np.testing.assert_array_equal(got.numpy(), np.rint(x * (2**bits - 1)) / (2**bits - 1))


@pytest.mark.parametrize("size", [2, 3])
def test_median_against_direct_computation(size):
    x = _images(size)
    before, after = size // 2, (size - 1) // 2  # scipy centres even windows at size // 2
    padded = np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)), mode="symmetric")
    h, w = x.shape[2:]
    windows = np.stack([padded[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size)])
    expected = np.sort(windows, axis=0)[size * size // 2]  # 2x2: the upper of the middle two
    np.testing.assert_array_equal(median_smooth(torch.from_numpy(x), size).numpy(), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_nl_means_against_scikit_image(channels):
    x = _images(7, (3, channels, 16, 16))
    params = NLMeans(search=11, block=3, strength=4.0)
    denoised = nl_means_denoise(torch.from_numpy(x), params).numpy()
    for i in range(3):
        image = x[i, 0] if channels == 1 else np.moveaxis(x[i], 0, -1)
        expected = denoise_nl_means(image, patch_size=3, patch_distance=5, h=4 / 255,
                                    fast_mode=True, channel_axis=None if channels == 1 else -1)
        got = denoised[i]
        got = got[0] if channels == 1 else np.moveaxis(got, 0, -1)
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_paper_settings():
    assert IMAGENET_SQUEEZERS == SqueezeConfig(5, 2, NLMeans(11, 3, 4.0))
    assert DIGITS_SQUEEZERS == SqueezeConfig(5, 2, NLMeans(13, 3, 2.0))
    with pytest.raises(ValueError, match="bits"):
        SqueezeConfig(bits=9)
    with pytest.raises(ValueError, match="at least one"):
        SqueezeConfig(None, None, None)


class _Checkerboard(nn.Module):
    """Logits 0 and 500 <x - mean(x), checkerboard> - 5: only the pixel pattern counts, and
    without it the first class wins with probability 0.993."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        board = (np.indices((size, size)).sum(0) % 2) * 2.0 - 1
        self.board = nn.Parameter(torch.tensor(board, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0] - x.mean((1, 2, 3))[:, None, None]
        return torch.stack([torch.zeros(len(x)), 500 * (x * self.board).mean((1, 2)) - 5], 1)


def test_known_answer_a_perturbation_that_squeezing_removes():
    model = _Checkerboard()
    clean = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(0)).expand(
        4, 1, 16, 16).contiguous()
    adversarial = (clean + 0.03 * model.board).clamp(0, 1)  # flips the class
    det = FeatureSqueezer(SqueezeConfig(bits=5, median=2, nl_means=None))
    clean_scores = det.score(screen_pass(model, clean, det))
    adv_scores = det.score(screen_pass(model, adversarial, det))
    np.testing.assert_allclose(clean_scores, 0.0, atol=1e-6)
    assert (adv_scores > 1.95).all()  # the median filter erases the pattern: L1 ~ 2


@pytest.mark.parametrize("batch_size", [2, 64])
def test_score_against_direct_computation(batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 8, 5))
    images = torch.from_numpy(_images(3))
    det = FeatureSqueezer(IMAGENET_SQUEEZERS)
    with torch.no_grad():
        p = model(images).double().softmax(1)
        x = images.numpy()
        squeezed = [np.rint(x * 31) / 31,
                    ndimage.median_filter(x, size=(1, 1, 2, 2), mode="reflect"),
                    np.stack([denoise_nl_means(i, channel_axis=0, patch_size=3, patch_distance=5,
                                               h=4 / 255, fast_mode=True) for i in x])]
        expected = torch.stack([
            (p - model(torch.from_numpy(s.astype(np.float32))).double().softmax(1)).abs().sum(1)
            for s in squeezed]).amax(0)
    got = det.score(screen_pass(model, images, det, batch_size=batch_size))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert list(det.squeezers) == ["bits5", "median2", "nl_means11-3-4.0"]


def test_save_load_round_trip(tmp_path):
    model = _Checkerboard()
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    det = FeatureSqueezer(DIGITS_SQUEEZERS, model="Net:abc")
    p = screen_pass(model, images, det)
    det = det.calibrate(det.score(p), 0.1)
    loaded = FeatureSqueezer.load(det.save(tmp_path / "squeeze.npz"))
    assert loaded == det
    np.testing.assert_array_equal(loaded.score(p), det.score(p))
    off = FeatureSqueezer(SqueezeConfig(nl_means=None))
    assert FeatureSqueezer.load(off.save(tmp_path / "off.npz")) == off
