"""What every detector shares: a threshold calibrated on clean scores, the model it screens for,
and one file format.

A detector is a frozen dataclass subclassing `Detector`, with the fields `model: str` (the
`model_identity` of the CNN its scores come from) and `threshold: Threshold | None`. Every
detector scores a `ScreenPass` (one pass of the classifier over the images) through
`score(p)`, reading what its `needs` names. Scores are higher for images more likely
adversarial; `flag` marks those above the threshold.

File format `frmap.detector/2`: an `.npz` archive (numpy's zip of `.npy` arrays, read with
`allow_pickle=False`: nothing in it can run code) holding the detector's arrays and, under the
key `meta`, one JSON document:

    {"format": "frmap.detector/2",
     "kind": "entropy" | "knn" | "squeeze" | "distance-evolution" | "mahalanobis" | "lid",
     "model": "<ClassName>:<sha256 prefix>", "threshold": null | {"value", "fpr",
     "achieved_fpr", "n_clean"}, "versions": {"frmap", "numpy", "torch"}, ...the kind's settings}

The entropy detector's JSON files of frmap 0.1 (`frmap.entropy-detector/1`) still load.

Every field of a file is validated on load (`FileFields`: types, finite numbers, known names,
bounded footprints, array shapes and dtypes), and an error names the file and the field: a
hand-edited or hostile file can neither disable detection (a NaN threshold) nor exhaust memory.

The parts live apart: the threshold (`threshold`), the field checks (`file_fields`), the npz
archive (`archive`) and the 0.1 reader (`legacy`); this module holds the base class and loads
any detector file.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from frmap.engine.detectors.archive import read_archive, read_bytes, versions, write_archive
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.legacy import entropy_detector_meta
from frmap.engine.detectors.screen_pass import Needs, ScreenPass
from frmap.engine.detectors.threshold import Threshold

FORMAT = "frmap.detector/2"

D = TypeVar("D", bound="Detector")


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

    @property
    def needs(self) -> Needs:
        """What `score` reads of a pass (by default: the features of `layers`)."""
        return Needs(layers=self.layers)

    def score(self, p: ScreenPass) -> np.ndarray:
        """`[N]` float64 scores of the pass's images: higher = more adversarial.

        The one scoring contract of every detector (`frmap.engine.detectors.screen_pass`): `p`
        holds at least what `needs` asks for.
        """
        raise NotImplementedError

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
        """The detector from what `_settings` and `_arrays` wrote, every field validated
        (read them through `FileFields(meta, arrays)`)."""
        raise NotImplementedError


def from_parts(meta: dict, arrays: dict[str, np.ndarray], source: str) -> Detector:
    """The detector of a document and arrays written by `Detector.parts`.

    Raises:
        ValueError: an unknown kind or a malformed document, naming `source`.
    """
    try:
        fields = FileFields(meta, arrays)
        kind = fields.text("kind", sorted(Detector._kinds))
    except ValueError as err:
        raise ValueError(f"{source}: unknown detector kind ({err})") from None
    try:
        model, threshold = fields.text("model"), fields.threshold()
        settings = {k: v for k, v in meta.items()
                    if k not in ("kind", "model", "threshold", "versions")}
        return Detector._kinds[kind]._from_file(settings, arrays, model=model,
                                                threshold=threshold)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: malformed {kind} detector: {err}") from None


def load_detector(path: str | Path) -> Detector:
    """Read any detector file (`frmap.detector/2`, or an entropy detector JSON of frmap 0.1).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a detector file, or a malformed one.
    """
    path = Path(path)
    raw = read_bytes(path, "detector")
    if raw.lstrip()[:1] == b"{":
        return from_parts(entropy_detector_meta(path, raw, FORMAT), {}, str(path))
    meta, arrays = read_archive(path, FORMAT, raw)
    meta.pop("versions", None)
    return from_parts(meta, arrays, str(path))
