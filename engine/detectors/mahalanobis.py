"""The Mahalanobis detector (Lee, Lee, Lee, Shin, NeurIPS 2018).

For each feature layer l, class-conditional Gaussians with one shared covariance are fitted on
the clean training features: the class means mu_c and the precision P = Sigma^-1 of the
features centred on their class mean (scikit-learn's `EmpiricalCovariance` or `LedoitWolf`).
An image's layer score is its distance to the closest class mean,

    M_l(x) = min_c sqrt((f_l(x) - mu_c)^T P_l (f_l(x) - mu_c)),

higher = more adversarial. The paper's optional input pre-processing moves the image a small
step `noise` against the gradient of that distance before scoring it,
x' = clip(x - noise * sign(grad_x M_l(x)), 0, 1), one step per layer. The layers' scores are
combined by a logistic regression fitted on clean and adversarial training examples
(`ScaledLogistic`); `layer_scores` gives each layer's score alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from torch import nn

from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.examples import Examples
from frmap.engine.detectors.features import Features, collect_features, pooled_outputs
from frmap.engine.detectors.logistic import ScaledLogistic
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.threshold import Threshold
from frmap.engine.models.runtime import model_device

COVARIANCES = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf}


@dataclass(frozen=True)
class MahalanobisConfig:
    """How the Mahalanobis detector is fitted.

    Attributes:
        layers: the feature layers (`Features.layers` keys).
        covariance: "empirical" or "ledoit-wolf" (shrunk: for layers with more dimensions
            than training images per class).
        noise: the input pre-processing step (0: none; the paper searches 0 to 0.005).
    """

    layers: tuple[str, ...]
    covariance: str = "empirical"
    noise: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("the Mahalanobis detector needs at least one layer")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {self.covariance!r}; expected one of "
                             f"{sorted(COVARIANCES)}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must lie in [0, 1), got {self.noise}")


def class_gaussians(x: np.ndarray, labels: np.ndarray, num_classes: int, covariance: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`[N, D]` features, `[N]` labels -> (`[C, D]` class means, `[D, D]` shared precision).

    Raises:
        ValueError: a class without members.
    """
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    empty = [c for c in range(num_classes) if not (labels == c).any()]
    if empty:
        raise ValueError(f"classes {empty} have no training samples")
    means = np.stack([x[labels == c].mean(0) for c in range(num_classes)])
    estimator = COVARIANCES[covariance](assume_centered=True).fit(x - means[labels])
    return means, estimator.precision_


def min_distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """`[N, D]` features -> `[N]` float64 Mahalanobis distance to the closest of `[C, D]` means."""
    diff = np.asarray(x, dtype=np.float64)[:, None, :] - means[None]
    squared = np.einsum("ncd,de,nce->nc", diff, precision, diff)
    return np.sqrt(np.maximum(squared.min(1), 0.0))


def min_distance_torch(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
                       ) -> torch.Tensor:
    """`min_distance` in torch, differentiable in `x`."""
    diff = x[:, None, :] - means[None]
    squared = torch.einsum("ncd,de,nce->nc", diff, precision, diff)
    return squared.min(1).values.clamp_min(1e-12).sqrt()


@dataclass(frozen=True, eq=False)
class MahalanobisDetector(Detector):
    """A fitted Mahalanobis detector (build it with `fit`).

    Attributes:
        means: per layer, `[C, D_l]` class means; precisions: per layer, `[D_l, D_l]`.
        combination: the logistic regression over the layers' scores.
    """

    kind = "mahalanobis"
    config: MahalanobisConfig
    model: str
    means: tuple[np.ndarray, ...]
    precisions: tuple[np.ndarray, ...]
    combination: ScaledLogistic
    threshold: Threshold | None = None

    @classmethod
    def fit(cls, clean: Features, labels: np.ndarray, examples: Examples,
            config: MahalanobisConfig, *, model: str = "") -> MahalanobisDetector:
        """Fit the Gaussians on clean training features and their labels, and the layer
        combination on clean and adversarial training `examples` (their features as scored,
        that is after pre-processing when `config.noise > 0`)."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(clean),):
            raise ValueError(f"labels must have shape [{len(clean)}], got {labels.shape}")
        classes = clean.logits.shape[1]
        fitted = [class_gaussians(clean.layer(name), labels, classes, config.covariance)
                  for name in config.layers]
        means, precisions = (tuple(f[i] for f in fitted) for i in (0, 1))
        scores = np.column_stack([min_distance(examples.features.layer(name), m, p) for
                                  name, m, p in zip(config.layers, means, precisions,
                                                    strict=True)])
        return cls(config, model, means, precisions,
                   ScaledLogistic.fit(scores, examples.adversarial))

    def with_combination(self, examples: Examples) -> MahalanobisDetector:
        """A copy whose layer combination is refitted on `examples` (for instance with the
        features `preprocessed_features` gives, which depend on the fitted Gaussians)."""
        return replace(self, combination=ScaledLogistic.fit(
            self.layer_scores(examples.features), examples.adversarial))

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    def layer_scores(self, features: Features) -> np.ndarray:
        """`[N, L]` float64, each layer's minimum Mahalanobis distance."""
        return np.column_stack([
            min_distance(features.layer(name), m, p)
            for name, m, p in zip(self.config.layers, self.means, self.precisions, strict=True)])

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64, the layer combination's decision value: higher = more adversarial.

        With `noise` > 0 the features are those of the pre-processed images
        (`preprocessed_features`, through the pass's classifier)."""
        return self.combination(self.layer_scores(self.scored_features(p)))

    def scored_features(self, p: ScreenPass) -> Features:
        """The features `score` reads: the pass's own, or those of its images after the
        pre-processing step when `noise` > 0."""
        if self.config.noise == 0:
            return p.features
        return self.preprocessed_features(p.classifier, p.images, batch_size=p.batch_size)

    def preprocessed_features(self, classifier: nn.Module, images: torch.Tensor, *,
                              batch_size: int = 128) -> Features:
        """The features to score: those of `images` after the pre-processing step of each
        layer (the layer's features of its own step), or of `images` when `noise` is 0."""
        if self.config.noise == 0:
            return collect_features(classifier, images, self.config.layers,
                                    batch_size=batch_size)
        device = model_device(classifier)
        layers: dict[str, np.ndarray] = {}
        logits = None
        for i, name in enumerate(self.config.layers):
            stepped = torch.cat([self._step(classifier, images[s:s + batch_size].to(device), i)
                                 for s in range(0, len(images), batch_size)])
            f = collect_features(classifier, stepped, (name,), batch_size=batch_size)
            layers[name] = f.layers[name]
            logits = f.logits if logits is None else logits
        return Features(layers, logits)

    def _step(self, classifier: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
        """`x` moved `noise` against the gradient of layer `layer`'s distance."""
        means, precision = (torch.as_tensor(a, dtype=torch.float64, device=x.device)
                            for a in (self.means[layer], self.precisions[layer]))
        x = x.detach().clone().requires_grad_()
        with torch.enable_grad():
            pooled = pooled_outputs(classifier, x, (self.config.layers[layer],))[0][0]
            min_distance_torch(pooled.double(), means, precision).sum().backward()
        return (x - self.config.noise * x.grad.sign()).clamp(0.0, 1.0).detach()

    def _settings(self) -> dict:
        return {"config": asdict(self.config)}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = self.combination.arrays("combination_")
        for i, (m, p) in enumerate(zip(self.means, self.precisions, strict=True)):
            arrays |= {f"means_{i}": m, f"precision_{i}": p}
        return arrays

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        config = MahalanobisConfig(**meta["config"])
        n = len(config.layers)
        return cls(config, model, tuple(arrays[f"means_{i}"] for i in range(n)),
                   tuple(arrays[f"precision_{i}"] for i in range(n)),
                   ScaledLogistic.from_arrays(arrays, "combination_"), threshold)
