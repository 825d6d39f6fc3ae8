"""The local intrinsic dimensionality (LID) detector (Ma et al., ICLR 2018).

For each feature layer, the maximum-likelihood LID estimate of an image from its k nearest
neighbours (L2, scikit-learn's `NearestNeighbors`) among a reference batch of clean training
features,

    LID(x) = -( (1/k) sum_i log(r_i(x) / r_k(x)) )^-1,   r_1 <= ... <= r_k the distances,

higher = more adversarial (adversarial regions have a higher local dimension). The layers'
estimates are combined by a logistic regression fitted on clean and adversarial training
examples of images outside the reference batch (`ScaledLogistic`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.neighbors import NearestNeighbors

from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.examples import Examples
from frmap.engine.detectors.features import Features
from frmap.engine.detectors.logistic import ScaledLogistic
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.threshold import Threshold


@dataclass(frozen=True)
class LIDConfig:
    """How the LID detector is fitted.

    Attributes:
        layers: the feature layers (`Features.layers` keys).
        k: neighbours of the estimate (the paper: 10 to 20 in batches of 100).
        reference: clean training images in the reference batch, at most.
        seed: seeds the draw of the reference batch.
    """

    layers: tuple[str, ...]
    k: int = 20
    reference: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("the LID detector needs at least one layer")
        if self.k < 2 or self.reference <= self.k:
            raise ValueError(f"LID needs k >= 2 and reference > k, got {self.k}, {self.reference}")


def lid_mle(distances: np.ndarray) -> np.ndarray:
    """`[N, k]` sorted neighbour distances -> `[N]` float64 maximum-likelihood LID estimates
    (distances are floored at 1e-12, so an estimate stays finite)."""
    r = np.maximum(np.asarray(distances, dtype=np.float64), 1e-12)
    mean_log = np.log(r / r[:, -1:]).mean(1)
    return -1.0 / np.minimum(mean_log, -1e-12)


@dataclass(frozen=True, eq=False)
class LIDDetector(Detector):
    """A fitted LID detector (build it with `fit`).

    Attributes:
        references: per layer, `[R, D_l]` the reference batch's features.
        combination: the logistic regression over the layers' estimates.
    """

    kind = "lid"
    config: LIDConfig
    model: str
    references: tuple[np.ndarray, ...]
    combination: ScaledLogistic
    threshold: Threshold | None = None
    _indexes: tuple[NearestNeighbors, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if any(len(r) < self.config.k for r in self.references):
            raise ValueError(f"k = {self.config.k} needs at least as many reference images")
        object.__setattr__(self, "_indexes", _indexes(self.references, self.config.k))

    @classmethod
    def fit(cls, examples: Examples, config: LIDConfig, *, model: str = "") -> LIDDetector:
        """Draw the reference batch from the clean `examples`, and fit the layer combination on
        the clean and adversarial versions of the other source images.

        Raises:
            ValueError: too few clean images to draw a reference batch and keep others.
        """
        clean = np.unique(examples.image[~examples.adversarial])
        n = min(config.reference, len(clean) // 2)
        if n <= config.k:
            raise ValueError(f"{len(clean)} clean images are too few for a reference batch of"
                             f" more than k = {config.k} images and others to fit on")
        chosen = np.random.default_rng(config.seed).permutation(clean)[:n]
        reference = examples.take(~examples.adversarial & np.isin(examples.image, chosen))
        rest = examples.take(~np.isin(examples.image, chosen))
        references = tuple(reference.features.layer(name).astype(np.float64)
                           for name in config.layers)
        estimates = _estimates(_indexes(references, config.k), config.layers, rest.features)
        return cls(config, model, references, ScaledLogistic.fit(estimates, rest.adversarial))

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    def layer_scores(self, features: Features) -> np.ndarray:
        """`[N, L]` float64, each layer's LID estimate."""
        return _estimates(self._indexes, self.config.layers, features)

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64, the layer combination's decision value: higher = more adversarial."""
        return self.combination(self.layer_scores(self.scored_features(p)))

    def scored_features(self, p: ScreenPass) -> Features:
        """The features `score` reads: the pass's own."""
        return p.features

    def _settings(self) -> dict:
        return {"config": asdict(self.config)}

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.combination.arrays("combination_") | {
            f"reference_{i}": r for i, r in enumerate(self.references)}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        config = LIDConfig(**meta["config"])
        return cls(config, model, tuple(arrays[f"reference_{i}"] for i in
                                        range(len(config.layers))),
                   ScaledLogistic.from_arrays(arrays, "combination_"), threshold)


def _indexes(references: tuple[np.ndarray, ...], k: int) -> tuple[NearestNeighbors, ...]:
    return tuple(NearestNeighbors(n_neighbors=k).fit(r) for r in references)


def _estimates(indexes: tuple[NearestNeighbors, ...], layers: tuple[str, ...],
               features: Features) -> np.ndarray:
    """`[N, L]` each layer's LID estimate among its reference features."""
    return np.column_stack([lid_mle(index.kneighbors(features.layer(name).astype(np.float64))[0])
                            for name, index in zip(layers, indexes, strict=True)])
