"""Feature squeezing (Xu, Evans, Qi, NDSS 2018), the baseline detector.

Each squeezer maps `[N, C, H, W]` images in [0, 1] to images in [0, 1]:

- bit depth b: `rint(x * (2^b - 1)) / (2^b - 1)`;
- median filter s x s (scipy's `median_filter`, mode "reflect"): for s = 2 the window holds
  the pixel and its upper and left neighbours, and the median of 4 values is the upper one
  (3rd smallest), as in the authors' code;
- non-local means (scikit-image's `denoise_nl_means`, fast mode, as `frmap.kernels.nl_means`
  computes it): the paper's OpenCV
  parameters "search window w, block b, strength h" on 0..255 images become
  `patch_distance = w // 2`, `patch_size = b`, `h = h / 255` on [0, 1] images.

The score is the largest L1 distance between the softmax of the image and of a squeezed
image, `max_s || p(x) - p(s(x)) ||_1` in [0, 2]: higher = more adversarial.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from frmap.engine.data.footprints import MAX_FOOTPRINT_SIDE
from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.screen_pass import Needs, ScreenPass, Squeeze
from frmap.engine.detectors.threshold import Threshold
from frmap.kernels import nl_means


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


def reduce_bit_depth(images: torch.Tensor, bits: int) -> torch.Tensor:
    """`[N, C, H, W]` in [0, 1] -> the nearest of the `2^bits` levels `i / (2^bits - 1)`
    (ties to even, as `np.rint`)."""
    levels = 2**bits - 1
    return torch.round(images * levels) / levels


def median_smooth(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, C, H, W]` -> the `size` x `size` median filter of every channel (see above).

    SciPy's filter runs on the whole batch at once: faster on the CPU than a torch sort of the
    unfolded windows (1.9 against 40 ms for 256 digits, 73 against 189 ms for 8 ImageNet
    images)."""
    x = images.detach().cpu().numpy()
    out = ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")
    return torch.from_numpy(out).to(images.device)


def nl_means_denoise(images: torch.Tensor, params: NLMeans) -> torch.Tensor:
    """`[N, C, H, W]` in [0, 1] -> non-local means of every image (colour images jointly):
    scikit-image's fast mode to the last bit, by `frmap.kernels.nl_means` (C++, small images
    a SIMD register's width at a time)."""
    out = nl_means(images.detach().cpu().numpy(), patch_size=params.block,
                   patch_distance=params.search // 2, h=params.strength / 255.0)
    return torch.from_numpy(out).to(images.device)


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

    @property
    def squeezers(self) -> dict[str, Squeeze]:
        """Squeezer key (its settings: "bits5", "median2", "nl_means13-3-2.0") -> squeezer."""
        c, out = self.config, {}
        if c.bits is not None:
            out[f"bits{c.bits}"] = partial(reduce_bit_depth, bits=c.bits)
        if c.median is not None:
            out[f"median{c.median}"] = partial(median_smooth, size=c.median)
        if c.nl_means is not None:
            n = c.nl_means
            out[f"nl_means{n.search}-{n.block}-{n.strength}"] = partial(nl_means_denoise,
                                                                         params=n)
        return out

    @property
    def needs(self) -> Needs:
        return Needs(squeezers=self.squeezers)

    def squeeze(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[N, C, H, W]` images in [0, 1] -> squeezer key -> squeezed images (same dtype)."""
        return {k: f(images) for k, f in self.squeezers.items()}

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64, the largest L1 distance between the softmax of the images and of a
        squeezed version (higher = more adversarial)."""
        probabilities = p.features.probabilities
        return np.max([np.abs(probabilities - p.squeezed[k]).sum(1) for k in self.squeezers],
                      axis=0)

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
