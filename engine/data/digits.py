"""The embedded default's data: scikit-learn's handwritten digits at 32x32, in three splits.

Data: `sklearn.datasets.load_digits` (1797 images, 8x8, values 0..16, shipped with
scikit-learn) divided by 16 into [0, 1] and upsampled to 32x32 with bilinear interpolation
(`align_corners=False`, a convex combination of neighbours, so values stay in [0, 1]).

Split (fixed): `train_test_split(range(1797), test_size=720, stratify=target, random_state=0)`
gives train (1077 images); the 720 held out are split again the same way in halves
(`test_size=360, random_state=0`) into calibration (360) and test (360). Each split keeps the
dataset's original order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLITS = ("train", "calibration", "test")
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DigitsSplit:
    """One split of the digits.

    Attributes:
        images: `[N, 1, 32, 32]` float32 in [0, 1].
        labels: `[N]` int64 in 0..9.
        index: `[N]` positions of the images in `load_digits()` order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: np.ndarray


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    small = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(
        small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    return images.clamp_(0.0, 1.0), torch.from_numpy(data.target.astype(np.int64))


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    target = _all_digits()[1].numpy()
    every = np.arange(len(target))
    train, held = train_test_split(every, test_size=720, stratify=target, random_state=0)
    calibration, test = train_test_split(held, test_size=360, stratify=target[held], random_state=0)
    return {"train": np.sort(train), "calibration": np.sort(calibration), "test": np.sort(test)}


def load_digits_split(split: str) -> DigitsSplit:
    """Load one split (`"train"`, `"calibration"` or `"test"`) of the 32x32 digits."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    images, labels = _all_digits()
    index = _split_indices()[split]
    picked = torch.from_numpy(index)
    return DigitsSplit(images[picked].clone(), labels[picked].clone(), index.copy())
