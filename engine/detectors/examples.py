"""Labelled detector examples: the clean and adversarial versions of some images, with their
features, and splits that keep every version of an image on one side.

The detectors that learn from adversarial examples (Mahalanobis' and LID's layer combination,
the distance-evolution networks) and the comparison that makes them share this type. Each
example carries the index of its source image, so splits (`split_by_image`,
`leave_one_attack_out`) never put versions of one image on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from frmap.engine.detectors.features import Features

CLEAN = "clean"


@dataclass(frozen=True)
class Examples:
    """Labelled detector examples: one row per image version (clean or adversarial).

    Attributes:
        features: the versions' features.
        attack: `[N]` str, the attack that made each version, or `CLEAN`.
        image: `[N]` int64, the index of the source image each version comes from.
    """

    features: Features
    attack: np.ndarray
    image: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "attack", np.asarray(self.attack, dtype=str))
        object.__setattr__(self, "image", np.asarray(self.image, dtype=np.int64))
        if not len(self.features) == len(self.attack) == len(self.image):
            raise ValueError(
                f"examples need as many attacks and images as features ({len(self.features)}),"
                f" got {len(self.attack)} and {len(self.image)}"
            )

    @classmethod
    def of(cls, features: Features, attack: str, image: np.ndarray) -> Examples:
        """The versions made by one attack (or `CLEAN`) of the source images `image`."""
        return cls(features, np.full(len(features), attack), image)

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        """The examples of `parts` one after another."""
        return cls(
            Features.concat([p.features for p in parts]),
            np.concatenate([p.attack for p in parts]),
            np.concatenate([p.image for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.image)

    def take(self, index: np.ndarray) -> Examples:
        """The examples at `index` (integers or a boolean mask)."""
        return Examples(self.features.take(index), self.attack[index], self.image[index])

    @property
    def adversarial(self) -> np.ndarray:
        """`[N]` bool, True for adversarial versions."""
        return self.attack != CLEAN

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks present, sorted."""
        return tuple(sorted(set(self.attack[self.adversarial].tolist())))


def split_by_image(
    examples: Examples, fraction: float, seed: int = 0
) -> tuple[Examples, Examples]:
    """Divide by source image: every version of an image lands on the same side.

    Returns:
        (the rest, the versions of a random `fraction` of the source images).
    """
    images = np.unique(examples.image)
    n = round(fraction * len(images))
    if not 0 < n < len(images):
        raise ValueError(
            f"a fraction of {fraction} of {len(images)} images leaves one side empty"
        )
    picked = np.isin(examples.image, np.random.default_rng(seed).permutation(images)[:n])
    return examples.take(~picked), examples.take(picked)


def leave_one_attack_out(
    examples: Examples, held_out: str, *, test_fraction: float = 0.3, seed: int = 0
) -> tuple[Examples, Examples]:
    """Split for testing on an attack never seen in training, on images never seen either.

    Returns:
        (training: the other attacks' and the clean versions of `1 - test_fraction` of the
        source images; test: the clean and `held_out` versions of the remaining images).
    """
    if held_out not in examples.attacks:
        raise ValueError(f"no {held_out!r} examples; the attacks are {examples.attacks}")
    train, test = split_by_image(examples, test_fraction, seed)
    return (train.take(train.attack != held_out),
            test.take(np.isin(test.attack, [CLEAN, held_out])))
