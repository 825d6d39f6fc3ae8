"""The feature-response entropy detector (Amirian et al. 2018): a calibrated threshold on the
mean local entropy of each image's response image (`frmap.engine.responses`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from frmap.engine.detectors.base import Detector, FileFields, Threshold
from frmap.engine.responses.targets import TARGETS
from frmap.kernels import RULES


@dataclass(frozen=True)
class EntropyDetector(Detector):
    """Flags an image as adversarial when its feature-response entropy exceeds a threshold.

    Attributes:
        footprint: the entropy window's name (see `frmap.engine.data.footprints`).
        rule, target: the response engine's backward rule and back-propagated target.
        model: the identity of the model the scores came from (`model_identity`).
        threshold: scores above its value are flagged.
    """

    kind = "entropy"
    footprint: str
    rule: str
    target: str
    model: str
    threshold: Threshold | None = None

    @classmethod
    def fit(cls, clean_scores: np.ndarray, *, fpr: float, footprint: str, rule: str,
            target: str, model: str) -> EntropyDetector:
        """Calibrate the threshold on clean scores to the false-positive rate `fpr`."""
        return cls(footprint, rule, target, model).calibrate(clean_scores, fpr)

    def _settings(self) -> dict:
        return {"footprint": self.footprint, "rule": self.rule, "target": self.target}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        f = FileFields(meta, arrays)
        return cls(f.footprint("footprint"), f.text("rule", RULES), f.text("target", TARGETS),
                   model, threshold)
