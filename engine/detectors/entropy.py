"""The feature-response entropy detector (Amirian et al. 2018): a calibrated threshold on the
mean local entropy of each image's response image (`frmap.engine.responses`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.screen_pass import EntropyNeed, Needs, ScreenPass
from frmap.engine.detectors.threshold import Threshold
from frmap.engine.responses.engine import PRECISIONS
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
        precision: the response engine's precision, "float32" or "bf16" (the threshold holds
            for scores computed in it; files without the field are float32).
    """

    kind = "entropy"
    footprint: str
    rule: str
    target: str
    model: str
    threshold: Threshold | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of "
                             f"{tuple(PRECISIONS)}")

    @classmethod
    def fit(cls, clean_scores: np.ndarray, *, fpr: float, footprint: str, rule: str,
            target: str, model: str, precision: str = "float32") -> EntropyDetector:
        """Calibrate the threshold on clean scores to the false-positive rate `fpr`."""
        return cls(footprint, rule, target, model, precision=precision).calibrate(clean_scores,
                                                                                  fpr)

    @property
    def needs(self) -> Needs:
        return Needs(entropy=(self.entropy_need,))

    @property
    def entropy_need(self) -> EntropyNeed:
        """The entropy scores it reads: its rule, target, precision and window."""
        return EntropyNeed(self.rule, self.target, self.precision, self.footprint)

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64, the mean local entropy of each image's response image."""
        return p.entropy[self.entropy_need]

    def _settings(self) -> dict:
        return {"footprint": self.footprint, "rule": self.rule, "target": self.target,
                "precision": self.precision}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        f = FileFields(meta, arrays)
        precision = "float32" if f.is_null("precision") else f.text("precision",
                                                                     tuple(PRECISIONS))
        return cls(f.footprint("footprint"), f.text("rule", RULES), f.text("target", TARGETS),
                   model, threshold, precision)
