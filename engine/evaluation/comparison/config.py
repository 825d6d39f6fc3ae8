"""What the comparison runs: the detectors it knows and its settings."""

from __future__ import annotations

from dataclasses import dataclass

from frmap.engine.attacks import ATTACKS
from frmap.engine.data.footprints import parse_footprint
from frmap.engine.detectors import (
    EvolutionConfig,
    KNNConfig,
    LIDConfig,
    MahalanobisConfig,
    SqueezeConfig,
)
from frmap.engine.detectors.squeeze import IMAGENET_SQUEEZERS
from frmap.engine.evaluation.adaptive import AdaptiveConfig

DETECTORS = ("entropy", "knn", "mahalanobis", "lid", "distance-lstm", "distance-mlp", "squeeze")
COMBINED = "combined"


@dataclass(frozen=True)
class ComparisonConfig:
    """What the comparison runs.

    Attributes:
        detectors: names from `DETECTORS`; the "combined" row is always added.
        attacks: attack names (see `frmap.engine.attacks.ATTACKS`).
        footprint, rule, target: the entropy detector's window, backward rule and target.
        precision: the entropy detector's response precision, "float32" or "bf16".
        preprocess: "imagenet" for torchvision ImageNet models, None for models taking the
            images as they are.
        layers: feature layers (None: `default_layers`); kNN, Mahalanobis and LID run on
            each of them alone.
        knn: the kNN score of the "knn" row (None: `KNNConfig` defaults on the last layer).
        mahalanobis, lid: their settings (None: the defaults on `layers`).
        evolution: the distance-evolution settings (None: `EvolutionConfig` defaults on
            `layers`); the network comes from the detector's name.
        squeeze: the feature squeezers.
        adaptive: the adaptive attack (None: none).
        operating_fpr: the false-positive rate of precision and recall.
        attack_limit: attack at most this many test images (None: all).
        train_limit: attack at most this many train images (None: all).
        combiner_fraction, validation_fraction: shares of the attacked train images kept for
            the combination and for the networks' epoch choice.
        batch_size: images per pass through the model.
        seed: seeds the attacks and the division of the train images.
        max_cost: the saved screener's budget: the best set among those whose screen costs at
            most this many forward passes of the classifier (None: any cost).
    """

    detectors: tuple[str, ...] = DETECTORS
    attacks: tuple[str, ...] = tuple(ATTACKS)
    footprint: str = "square3"
    rule: str = "guided"
    target: str = "conv_max"
    precision: str = "float32"
    preprocess: str | None = None
    layers: tuple[str, ...] | None = None
    knn: KNNConfig | None = None
    mahalanobis: MahalanobisConfig | None = None
    lid: LIDConfig | None = None
    evolution: EvolutionConfig | None = None
    squeeze: SqueezeConfig = IMAGENET_SQUEEZERS
    adaptive: AdaptiveConfig | None = None
    operating_fpr: float = 0.05
    attack_limit: int | None = None
    train_limit: int | None = None
    combiner_fraction: float = 0.3
    validation_fraction: float = 0.2
    batch_size: int = 64
    seed: int = 0
    max_cost: float | None = None

    def __post_init__(self) -> None:
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ValueError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
        parse_footprint(self.footprint)
        if not (0 < self.combiner_fraction and 0 < self.validation_fraction
                and self.combiner_fraction + self.validation_fraction < 1):
            raise ValueError("the combiner and validation fractions must be > 0, sum below 1")
        if self.max_cost is not None and not self.max_cost >= 1:
            raise ValueError(f"max_cost is in forward passes and at least 1 (the classifier's "
                             f"own), got {self.max_cost}")


DEFAULT_CONFIG = ComparisonConfig()
