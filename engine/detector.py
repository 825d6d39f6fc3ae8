"""Threshold detectors calibrated on clean scores, and the feature-response entropy detector."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import write_json

FORMAT = "frmap.entropy-detector/1"


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


def model_identity(model: nn.Module) -> str:
    """`ClassName:sha256-prefix` of the model's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}:{digest.hexdigest()[:16]}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "numpy": np.__version__}
    try:
        out["frmap"] = version("frmap")
    except PackageNotFoundError:
        out["frmap"] = "unknown"
    return out


@dataclass(frozen=True)
class EntropyDetector:
    """Flags an image as adversarial when its feature-response entropy exceeds a threshold.

    Attributes:
        threshold: scores above it are flagged.
        fpr: the false-positive rate it was calibrated for, on `n_clean` clean images.
        achieved_fpr: the share of the calibration scores it flags.
        footprint: the entropy window's name (see `frmap.engine.footprints`).
        rule, target: the response engine's backward rule and back-propagated target.
        model: the identity of the model the scores came from (`model_identity`).
    """

    threshold: float
    fpr: float
    achieved_fpr: float
    n_clean: int
    footprint: str
    rule: str
    target: str
    model: str
    versions: dict[str, str] = field(default_factory=_versions)

    @classmethod
    def fit(
        cls,
        clean_scores: np.ndarray,
        *,
        fpr: float,
        footprint: str,
        rule: str,
        target: str,
        model: str,
    ) -> EntropyDetector:
        """Calibrate the threshold on clean scores to the false-positive rate `fpr`."""
        scores = np.asarray(clean_scores, dtype=np.float64)
        threshold = calibrate_threshold(scores, fpr)
        return cls(
            threshold=threshold,
            fpr=fpr,
            achieved_fpr=float((scores > threshold).mean()),
            n_clean=int(scores.size),
            footprint=footprint,
            rule=rule,
            target=target,
            model=model,
        )

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """[N] scores -> [N] bool, True = adversarial."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def check_model(self, model: str) -> None:
        """Raise ValueError unless the scores come from the model this detector was fit for."""
        if model != self.model:
            raise ValueError(
                f"the detector was calibrated for model {self.model}, not for {model}"
            )

    def save(self, path: str | Path) -> Path:
        """Write the detector as JSON (atomically)."""
        return write_json(path, {"format": FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> EntropyDetector:
        """Read a detector written by `save`, with a clear error for anything else."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such detector file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a detector file (invalid JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a detector file (format is not {FORMAT})")
        data.pop("format")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{path}: malformed detector file ({err})") from None
