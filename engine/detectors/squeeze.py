"""Feature squeezing (Xu, Evans, Qi, NDSS 2018), the baseline detector.

Each squeezer maps `[N, C, H, W]` images in [0, 1] to images in [0, 1]:

- bit depth b: `rint(x * (2^b - 1)) / (2^b - 1)`;
- median filter s x s (scipy's `median_filter`, mode "reflect"): for s = 2 the window holds
  the pixel and its upper and left neighbours, and the median of 4 values is the upper one
  (3rd smallest), as in the authors' code;
- non-local means (scikit-image's `denoise_nl_means`, fast mode): the paper's OpenCV
  parameters "search window w, block b, strength h" on 0..255 images become
  `patch_distance = w // 2`, `patch_size = b`, `h = h / 255` on [0, 1] images.

The score is the largest L1 distance between the softmax of the image and of a squeezed
image, `max_s || p(x) - p(s(x)) ||_1` in [0, 2]: higher = more adversarial.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.restoration import denoise_nl_means
from torch import nn

from frmap.engine.data.footprints import MAX_FOOTPRINT_SIDE
from frmap.engine.detectors.base import Detector, FileFields, Threshold
from frmap.engine.detectors.features import Features, collect_features


@dataclass(frozen=True)
class NLMeans:
    """Non-local means in the paper's OpenCV terms (see the module docstring).

    Attributes:
        search: side of the search window (odd).
        block: side of the compared patches.
        strength: filter strength h in gray levels of a 0..255 image.
    """

    search: int = 11
    block: int = 3
    strength: float = 4.0


@dataclass(frozen=True)
class SqueezeConfig:
    """Which squeezers run; None switches one off.

    Attributes:
        bits: colour depth in bits (1..8).
        median: side of the median filter window (files: at most 65).
        nl_means: non-local means parameters (files: windows of at most 65).
    """

    bits: int | None = 5
    median: int | None = 2
    nl_means: NLMeans | None = NLMeans()

    def __post_init__(self) -> None:
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise ValueError(f"bits must lie in 1..8, got {self.bits}")
        if self.median is not None and self.median < 1:
            raise ValueError(f"the median window must be >= 1, got {self.median}")
        if self.bits is None and self.median is None and self.nl_means is None:
            raise ValueError("feature squeezing needs at least one squeezer")


# The paper's ImageNet squeezers, and its CIFAR-10 ones (32x32 images) for the digits.
IMAGENET_SQUEEZERS = SqueezeConfig()
DIGITS_SQUEEZERS = SqueezeConfig(bits=5, median=2,
                                 nl_means=NLMeans(search=13, block=3, strength=2.0))


def reduce_bit_depth(images: np.ndarray, bits: int) -> np.ndarray:
    """`[N, C, H, W]` in [0, 1] -> the nearest of the `2^bits` levels `i / (2^bits - 1)`."""
    levels = 2**bits - 1
    return (np.rint(images * levels) / levels).astype(images.dtype)


def median_smooth(images: np.ndarray, size: int) -> np.ndarray:
    """`[N, C, H, W]` -> the `size` x `size` median filter of every channel (see above)."""
    return ndimage.median_filter(images, size=(1, 1, size, size), mode="reflect")


def nl_means_denoise(images: np.ndarray, params: NLMeans) -> np.ndarray:
    """`[N, C, H, W]` in [0, 1] -> non-local means of every image (colour images jointly)."""
    kwargs = {"patch_size": params.block, "patch_distance": params.search // 2,
              "h": params.strength / 255.0, "fast_mode": True}
    if images.shape[1] == 1:
        out = [denoise_nl_means(x[0], **kwargs)[None] for x in images]
    else:
        out = [denoise_nl_means(x, channel_axis=0, **kwargs) for x in images]
    return np.stack(out).astype(images.dtype)


@dataclass(frozen=True)
class FeatureSqueezer(Detector):
    """The feature-squeezing detector; it has nothing to fit but its threshold.

    Attributes:
        config: the squeezers.
        model: the `model_identity` of the CNN it screens for (checked with `check_model`).
    """

    kind = "squeeze"
    config: SqueezeConfig = IMAGENET_SQUEEZERS
    model: str = ""
    threshold: Threshold | None = None

    def squeeze(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[N, C, H, W]` images in [0, 1] -> squeezer name -> squeezed images (same dtype)."""
        x = images.detach().cpu().numpy()
        out = {}
        if self.config.bits is not None:
            out[f"bits{self.config.bits}"] = reduce_bit_depth(x, self.config.bits)
        if self.config.median is not None:
            out[f"median{self.config.median}"] = median_smooth(x, self.config.median)
        if self.config.nl_means is not None:
            out["nl_means"] = nl_means_denoise(x, self.config.nl_means)
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def score(
        self,
        model: nn.Module,
        images: torch.Tensor,
        features: Features | None = None,
        *,
        batch_size: int = 128,
    ) -> np.ndarray:
        """`[N]` float64, the largest L1 distance between the softmax of `images` and of a
        squeezed version (higher = more adversarial).

        Args:
            model: The classifier, taking `[N, C, H, W]` images in [0, 1].
            images: The images to screen.
            features: The shared forward pass over `images`, where there is one (its logits
                give the images' softmax); otherwise the model runs once more.
            batch_size: Images per forward pass.
        """
        if features is None:
            features = collect_features(model, images, (), batch_size=batch_size)
        p = features.probabilities
        return np.max([
            np.abs(p - collect_features(model, s, (), batch_size=batch_size).probabilities)
            .sum(1)
            for s in self.squeeze(images).values()
        ], axis=0)

    def _settings(self) -> dict:
        return {"config": asdict(self.config)}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        c = FileFields(meta, arrays).section("config")
        nl_means = None
        if not c.is_null("nl_means"):
            n = c.section("nl_means")
            nl_means = NLMeans(n.integer("search", 1, MAX_FOOTPRINT_SIDE),
                               n.integer("block", 1, MAX_FOOTPRINT_SIDE),
                               n.number("strength", 1e-3, 255.0))
        config = SqueezeConfig(
            bits=None if c.is_null("bits") else c.integer("bits", 1, 8),
            median=None if c.is_null("median") else c.integer("median", 1, MAX_FOOTPRINT_SIDE),
            nl_means=nl_means)
        return cls(config, model, threshold)
