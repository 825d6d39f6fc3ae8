"""The score-level combination of detectors: a logistic regression over standardised scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from frmap.engine.detectors.logistic import ScaledLogistic


@dataclass(frozen=True, eq=False)
class Combiner:
    """`z = ((x - mean) / scale) @ weights + intercept` over the detectors' scores `x`.

    The decision value of the detectors' `ScaledLogistic` (a logistic regression fitted on
    standardised scores, clean and adversarial images weighing the same), kept with the
    detectors' names; higher = more adversarial.

    Attributes:
        names: the detectors, in the order of the columns of `x`.
        mean, scale: `[D]` the standardisation.
        weights: `[D]` the weight of each standardised score; intercept: the bias.
    """

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: float

    def __post_init__(self) -> None:
        d = len(self.names)
        if any(np.shape(a) != (d,) for a in (self.mean, self.scale, self.weights)):
            raise ValueError(f"a combiner of {d} detectors needs mean, scale and weights of "
                             f"shape [{d}]")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.weights).all()
                and np.isfinite(self.intercept) and (self.scale > 0).all()):
            raise ValueError("the combiner's parameters must be finite, its scales positive")

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray], adversarial: np.ndarray) -> Combiner:
        """Fit on `[N]` scores per detector and `[N]` bool labels (True = adversarial).

        Raises:
            ValueError: the labels hold only one class.
        """
        x = np.column_stack([np.asarray(s, np.float64) for s in scores.values()])
        fitted = ScaledLogistic.fit(x, adversarial, what="the combination", examples="images")
        return cls(tuple(scores), fitted.mean, fitted.scale, fitted.coef, fitted.intercept)

    def __call__(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """`[N]` float64 decision values of the detectors' `[N]` scores."""
        x = np.column_stack([np.asarray(scores[n], np.float64) for n in self.names])
        return ScaledLogistic(self.mean, self.scale, self.weights, self.intercept)(x)

    def weight_of(self) -> dict[str, float]:
        """Each detector's weight on its standardised score."""
        return dict(zip(self.names, self.weights.tolist(), strict=True))

    def parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        """As a JSON-ready document and arrays."""
        return ({"names": list(self.names), "intercept": self.intercept},
                {"mean": self.mean, "scale": self.scale, "weights": self.weights})

    @classmethod
    def from_parts(cls, meta: dict, arrays: dict[str, np.ndarray]) -> Combiner:
        names: Sequence[str] = meta["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"combiner names must be a list of strings, got {names!r}")
        if isinstance(meta["intercept"], bool) or not isinstance(meta["intercept"], int | float):
            raise ValueError(f"combiner intercept must be a number, got {meta['intercept']!r}")
        return cls(tuple(names), *(np.asarray(arrays[k], np.float64)
                                   for k in ("mean", "scale", "weights")),
                   float(meta["intercept"]))
