"""What every detector shares: a threshold calibrated on clean scores, the model it screens for,
and one file format.

A detector is a frozen dataclass subclassing `Detector`, with the fields `model: str` (the
`model_identity` of the CNN its scores come from) and `threshold: Threshold | None`. Scores are
higher for images more likely adversarial; `flag` marks those above the threshold.

File format `frmap.detector/2`: an `.npz` archive (numpy's zip of `.npy` arrays, read with
`allow_pickle=False`: nothing in it can run code) holding the detector's arrays and, under the
key `meta`, one JSON document:

    {"format": "frmap.detector/2", "kind": "entropy" | "knn" | "squeeze" | "distance-evolution",
     "model": "<ClassName>:<sha256 prefix>", "threshold": null | {"value", "fpr",
     "achieved_fpr", "n_clean"}, "versions": {"frmap", "numpy", "torch"}, ...the kind's settings}

The entropy detector's JSON files of frmap 0.1 (`frmap.entropy-detector/1`) still load.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import torch

from frmap.engine.data.files import atomic_write_bytes

FORMAT = "frmap.detector/2"

D = TypeVar("D", bound="Detector")


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


class Detector:
    """Base of every detector: calibration, flags, the model check and the file format.

    A subclass sets `kind`, and writes and reads its own settings and arrays through
    `_settings`, `_arrays` and `_from_file`.
    """

    kind: ClassVar[str]
    _kinds: ClassVar[dict[str, type[Detector]]] = {}
    threshold: Threshold | None
    model: str

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Detector._kinds[cls.kind] = cls

    def calibrate(self: D, clean_scores: np.ndarray, fpr: float) -> D:
        """A copy with the threshold calibrated on clean scores to the false-positive rate."""
        return replace(self, threshold=Threshold.fit(clean_scores, fpr))

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """`[N]` scores -> `[N]` bool, True = adversarial."""
        if self.threshold is None:
            raise ValueError("the detector has no threshold yet; calibrate it first")
        return np.asarray(scores, dtype=np.float64) > self.threshold.value

    def check_model(self, model: str) -> None:
        """Raise ValueError unless the scores come from the model this detector was fit for."""
        if model != self.model:
            raise ValueError(f"the detector was fit for model {self.model}, not for {model}")

    @property
    def layers(self) -> tuple[str, ...]:
        """The feature layers its scores read (`collect_features`); none for the others."""
        return ()

    def parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The detector as a JSON-ready document and its arrays (what `save` writes)."""
        meta = {"kind": self.kind, "model": self.model,
                "threshold": None if self.threshold is None else asdict(self.threshold),
                **self._settings()}
        return meta, self._arrays()

    def save(self, path: str | Path) -> Path:
        """Write the detector to `path` in the `frmap.detector/2` format (atomically)."""
        meta, arrays = self.parts()
        return write_archive(path, {"format": FORMAT, "versions": versions(), **meta}, arrays)

    @classmethod
    def load(cls: type[D], path: str | Path) -> D:
        """Read a detector of this class written by `save`, with a clear error for anything else.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: not a detector file, a detector of another kind, or a malformed one.
        """
        detector = load_detector(path)
        if not isinstance(detector, cls):
            raise ValueError(f"{path}: holds a detector of kind {detector.kind}, not {cls.kind}")
        return detector

    def _settings(self) -> dict:
        """The kind's settings as JSON-ready values (the file's `meta` beyond the common keys)."""
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays, by name."""
        return {}

    @classmethod
    def _from_file(cls: type[D], meta: dict, arrays: dict[str, np.ndarray], *, model: str,
                   threshold: Threshold | None) -> D:
        """The detector from what `_settings` and `_arrays` wrote."""
        raise NotImplementedError


def from_parts(meta: dict, arrays: dict[str, np.ndarray], source: str) -> Detector:
    """The detector of a document and arrays written by `Detector.parts`.

    Raises:
        ValueError: an unknown kind or a malformed document, naming `source`.
    """
    meta = dict(meta)
    kind = meta.pop("kind", None)
    if kind not in Detector._kinds:
        raise ValueError(f"{source}: unknown detector kind {kind!r}; expected one of "
                         f"{sorted(Detector._kinds)}")
    try:
        threshold = meta.pop("threshold")
        model = meta.pop("model")
        return Detector._kinds[kind]._from_file(
            meta, arrays, model=model, threshold=None if threshold is None else Threshold(
                **threshold))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: malformed {kind} detector ({err!r})") from None


def load_detector(path: str | Path) -> Detector:
    """Read any detector file (`frmap.detector/2`, or an entropy detector JSON of frmap 0.1).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a detector file, or a malformed one.
    """
    path = Path(path)
    raw = _read_bytes(path, "detector")
    if raw.lstrip()[:1] == b"{":
        return from_parts(_read_entropy_json(path, raw), {}, str(path))
    meta, arrays = read_archive(path, FORMAT, raw)
    meta.pop("versions", None)
    return from_parts(meta, arrays, str(path))


def write_archive(path: str | Path, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write `meta` (JSON, with its "format") and `arrays` as one `.npz` archive, atomically."""
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def read_archive(path: Path, fmt: str, raw: bytes | None = None
                 ) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta document (without its format) and the arrays of an archive of format `fmt`.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a readable archive of that format.
    """
    what = fmt.split("/")[0].removeprefix("frmap.")
    raw = _read_bytes(path, what) if raw is None else raw
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a {what} file (not a readable npz: {err})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.pop("format", None) != fmt:
        raise ValueError(f"{path}: not a {what} file (format is not {fmt})")
    return meta, arrays


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None


def _read_entropy_json(path: Path, raw: bytes) -> dict:
    """The meta document of an entropy detector JSON file of frmap 0.1."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a detector file (invalid JSON: {err})") from None
    if not isinstance(data, dict) or data.pop("format", None) != "frmap.entropy-detector/1":
        raise ValueError(f"{path}: not a detector file (format is not {FORMAT})")
    threshold = {k: data.pop(k, None) for k in ("fpr", "achieved_fpr", "n_clean")}
    return {"kind": "entropy", **data, "threshold": {"value": data.pop("threshold", None),
                                                     **threshold}}


def versions() -> dict[str, str]:
    """The versions of frmap, numpy and torch, recorded in every file frmap writes."""
    try:
        frmap = version("frmap")
    except PackageNotFoundError:
        frmap = "unknown"
    return {"frmap": frmap, "numpy": np.__version__, "torch": torch.__version__}
