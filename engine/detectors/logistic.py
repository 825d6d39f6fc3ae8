"""One scaled logistic regression: the combination of several scores into one.

A logistic regression over standardised scores, fitted with clean and adversarial examples
weighing the same (Lee et al. 2018, Ma et al. 2018). The Mahalanobis and LID detectors combine
their per-layer scores with it; a screener's `Combiner` combines its detectors' scores with it.
The fit is kept as plain arrays so that it saves and loads exactly:

    score = ((s - mean) / scale) @ coef + intercept,   s = [N, L] the scores to combine
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True, eq=False)
class ScaledLogistic:
    """A fitted logistic regression over L standardised scores (`[L]` arrays and an intercept)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, scores: np.ndarray, adversarial: np.ndarray, *,
            what: str = "the layer combination", examples: str = "examples") -> ScaledLogistic:
        """Fit on `[N, L]` scores of examples, `[N]` bool True = adversarial (both classes
        weigh the same).

        Raises:
            ValueError: the examples lack clean or adversarial ones (the message names `what`
                needs which `examples`).
        """
        y = np.asarray(adversarial, dtype=bool)
        if y.all() or not y.any():
            raise ValueError(f"{what} needs clean and adversarial {examples}")
        scaler = StandardScaler().fit(scores)
        regression = LogisticRegression(class_weight="balanced").fit(scaler.transform(scores), y)
        return cls(scaler.mean_, scaler.scale_, regression.coef_[0].copy(),
                   float(regression.intercept_[0]))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """`[N, L]` scores -> `[N]` float64 decision values (higher = adversarial)."""
        return (np.asarray(scores, dtype=np.float64) - self.mean) / self.scale @ self.coef \
            + self.intercept

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays to save, under `prefix`."""
        return {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale,
                f"{prefix}coef": self.coef, f"{prefix}intercept": np.array(self.intercept)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> ScaledLogistic:
        """The combination `arrays` wrote under `prefix`."""
        return cls(arrays[f"{prefix}mean"], arrays[f"{prefix}scale"], arrays[f"{prefix}coef"],
                   float(arrays[f"{prefix}intercept"]))
