"""The kNN authenticity score (Carrara et al., Multimedia Tools and Applications 2018).

One layer's features of the training images are reduced with PCA (scikit-learn); for an image,
its k nearest training features (L2, brute force: one matrix product per batch of queries,
which at batch 1 costs microseconds where a tree or scikit-learn's threaded search costs a
millisecond) vote for their labels,
and the authenticity is the weighted share of the votes that go to the class the CNN predicts:

    share = sum_i w_i [label_i == predicted] / sum_i w_i,   i = 1..k, nearest first

with w_i = 1 (uniform), 1 / i (rank) or 1 / d_i^2 (distance). A low share means the image's
neighbourhood disagrees with the prediction, so the score is `1 - share` (higher = more
adversarial).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.decomposition import PCA

from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.features import Features
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.threshold import Threshold

WEIGHTS = ("uniform", "rank", "distance")
_ARRAYS = ("mean", "components", "scale", "train", "labels")


@dataclass(frozen=True)
class KNNConfig:
    """How the kNN score is computed.

    Attributes:
        layer: the feature layer (a `Features.layers` key).
        components: PCA components kept, at most (fewer where the layer or the training set
            has fewer dimensions or samples).
        whiten: scale each component to unit variance.
        k: neighbours that vote.
        weights: "uniform", "rank" (1 / rank) or "distance" (1 / d^2).
    """

    layer: str
    components: int = 256
    whiten: bool = False
    k: int = 50
    weights: str = "rank"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"unknown weights {self.weights!r}; expected one of {WEIGHTS}")
        if self.components < 1 or self.k < 1:
            raise ValueError(f"components and k must be >= 1, got {self.components}, {self.k}")


@dataclass(frozen=True, eq=False)
class KNNDetector(Detector):
    """A fitted kNN authenticity detector (build it with `fit`).

    Attributes:
        mean, components, scale: the PCA, `z = (x - mean) @ components.T / scale` with
            `[D]`, `[d, D]` and `[d]` (scale: ones, or the components' standard deviations
            when whitened).
        train: `[N, d]` the reduced training features; `labels`: `[N]` their classes.
        model: the `model_identity` of the CNN the features come from.
    """

    kind = "knn"
    config: KNNConfig
    model: str
    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    train: np.ndarray
    labels: np.ndarray
    threshold: Threshold | None = None
    _train_sq: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.config.k <= len(self.train):
            raise ValueError(f"k = {self.config.k} needs 1..{len(self.train)} training samples")
        object.__setattr__(self, "_train_sq", (self.train**2).sum(1))

    @classmethod
    def fit(
        cls, features: Features, labels: np.ndarray, config: KNNConfig, *, model: str = ""
    ) -> KNNDetector:
        """Fit the PCA and the neighbour index on training features and their labels."""
        x = features.layer(config.layer).astype(np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape [{len(x)}], got {labels.shape}")
        n = min(config.components, *x.shape)
        pca = PCA(n_components=n, whiten=config.whiten, random_state=0).fit(x)
        scale = np.sqrt(pca.explained_variance_) if config.whiten else np.ones(n)
        return cls(
            config=config,
            model=model,
            mean=pca.mean_,
            components=pca.components_,
            scale=scale,
            train=(x - pca.mean_) @ pca.components_.T / scale,
            labels=labels,
        )

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.config.layer,)

    def reduce(self, features: Features) -> np.ndarray:
        """`[N, d]` the PCA-reduced features of the configured layer."""
        return (features.layer(self.config.layer) - self.mean) @ self.components.T / self.scale

    def neighbours(self, features: Features, chunk: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest training samples: (`[N, k]` distances, `[N, k]` indices), nearest first
        (equal distances by index), by brute force on `chunk` queries at a time."""
        z = self.reduce(features)
        if not len(z):
            return np.zeros((0, self.config.k)), np.zeros((0, self.config.k), np.int64)
        distances, indices = zip(*(self._nearest(z[i:i + chunk])
                                   for i in range(0, len(z), chunk)), strict=True)
        return np.concatenate(distances), np.concatenate(indices)

    def _nearest(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # |z - t|^2 = |z|^2 + |t|^2 - 2 z.t, clipped at 0 against rounding
        d2 = np.maximum((z**2).sum(1)[:, None] + self._train_sq - 2 * z @ self.train.T, 0.0)
        k, rows = self.config.k, np.arange(len(z))[:, None]
        part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else \
            np.broadcast_to(np.arange(k), d2.shape)
        near = d2[rows, part]
        order = np.lexsort((part, near), axis=1)
        return np.sqrt(near[rows, order]), part[rows, order]

    def share(self, features: Features) -> np.ndarray:
        """`[N]` the weighted share of the predicted class among the k neighbours' labels."""
        distances, indices = self.neighbours(features)
        agree = self.labels[indices] == features.predictions[:, None]
        if self.config.weights == "distance":  # a neighbour at distance 0 counts as at 1e-12
            w = 1.0 / np.maximum(distances, 1e-12) ** 2
            return (w * agree).sum(1) / w.sum(1)
        w = np.ones(self.config.k) if self.config.weights == "uniform" else \
            1.0 / np.arange(1, self.config.k + 1)
        return (w * agree).sum(1) / w.sum()  # summed as the total is: all agreeing gives 1

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64, `1 - share` of the pass's features: higher = more adversarial."""
        return 1.0 - self.share(p.features)

    def _settings(self) -> dict:
        return {"config": asdict(self.config)}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _ARRAYS}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        f = FileFields(meta, arrays)
        c = f.section("config")
        config = KNNConfig(c.text("layer"), c.integer("components", 1), c.boolean("whiten"),
                           c.integer("k", 1), c.text("weights", WEIGHTS))
        mean = f.array("mean", (None,))
        components = f.array("components", (None, len(mean)))
        scale = f.array("scale", (len(components),))
        train = f.array("train", (None, len(components)))
        labels = f.array("labels", (len(train),), "i")
        if not (scale > 0).all():
            raise ValueError("array 'scale' must be positive")
        return cls(config=config, model=model, threshold=threshold, mean=mean,
                   components=components, scale=scale, train=train, labels=labels)
