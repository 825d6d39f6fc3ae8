"""A decision threshold calibrated on clean scores to a false-positive rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def calibrate_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The threshold that flags at most a share `fpr` of `clean_scores` (flag: score > threshold).

    With n clean scores, at most floor(fpr * n) lie above the returned value, and exactly that
    many where the scores have no ties.
    """
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("calibration needs at least one clean score")
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores hold NaN or Inf")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"the false-positive rate must lie in [0, 1), got {fpr}")
    allowed = math.floor(fpr * scores.size + 1e-9)
    return float(scores[allowed])


@dataclass(frozen=True)
class Threshold:
    """A decision threshold calibrated on clean scores (flag: score > value).

    Attributes:
        value: the threshold.
        fpr: the false-positive rate asked for.
        achieved_fpr: the share of the `n_clean` calibration scores it flags.
    """

    value: float
    fpr: float
    achieved_fpr: float
    n_clean: int

    @classmethod
    def fit(cls, clean_scores: np.ndarray, fpr: float) -> Threshold:
        """Calibrate with `calibrate_threshold` on clean scores (higher = more adversarial)."""
        scores = np.asarray(clean_scores, dtype=np.float64)
        value = calibrate_threshold(scores, fpr)
        return cls(value, fpr, float((scores > value).mean()), int(scores.size))
