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
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar, NoReturn, TypeVar

import numpy as np
import torch

from frmap.engine.data.files import atomic_write_bytes
from frmap.engine.data.footprints import parse_footprint
from frmap.engine.detectors.screen_pass import Needs, ScreenPass

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


class FileFields:
    """Validated reads of a file's JSON settings and arrays; each error names the field.

    `load_detector` prefixes the file's path to the errors. Numbers must be finite, integers
    are not booleans, names must be among the known ones, and floating-point arrays finite.

    Args:
        meta: the JSON object (or one nested object of it).
        arrays: the file's arrays by name.
        prefix: the nested object's place, for messages (e.g. "config.").
    """

    def __init__(self, meta: object, arrays: dict[str, np.ndarray] | None = None,
                 prefix: str = "") -> None:
        if not isinstance(meta, dict):
            where = f"field {prefix.rstrip('.')!r}" if prefix else "the settings"
            raise ValueError(f"{where} must be a JSON object, got {type(meta).__name__}")
        self.meta, self.arrays, self.prefix = meta, arrays or {}, prefix

    def fail(self, key: str, problem: str) -> NoReturn:
        """Raise ValueError naming the field `key`."""
        raise ValueError(f"field {self.prefix + key!r} {problem}")

    def value(self, key: str) -> object:
        """The raw value of `key` (a missing field is an error)."""
        if key not in self.meta:
            self.fail(key, "is missing")
        return self.meta[key]

    def is_null(self, key: str) -> bool:
        """True where `key` is missing or null (an optional setting switched off)."""
        return self.meta.get(key) is None

    def text(self, key: str, choices: tuple[str, ...] | list[str] | None = None) -> str:
        """A string, one of `choices` where given."""
        v = self.value(key)
        if not isinstance(v, str) or (choices is not None and v not in choices):
            self.fail(key, f"must be {'one of ' + repr(tuple(choices)) if choices else 'a string'}"
                           f", got {v!r}")
        return v

    def integer(self, key: str, low: int | None = None, high: int | None = None) -> int:
        """An integer in [low, high]."""
        v = self.value(key)
        if not isinstance(v, int) or isinstance(v, bool) or (low is not None and v < low) or (
                high is not None and v > high):
            bounds = "" if (low, high) == (None, None) else \
                f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            self.fail(key, f"must be an integer{bounds}, got {v!r}")
        return v

    def number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float:
        """A finite number in [low, high]."""
        v = self.value(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or \
                not low <= v <= high:
            bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
            self.fail(key, f"must be a finite number{bounds}, got {v!r}")
        return float(v)

    def boolean(self, key: str) -> bool:
        v = self.value(key)
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {v!r}")
        return v

    def texts(self, key: str) -> tuple[str, ...]:
        """A non-empty list of strings."""
        v = self.value(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            self.fail(key, f"must be a non-empty list of strings, got {v!r}")
        return tuple(v)

    def numbers(self, key: str) -> tuple[float, ...]:
        """A list of finite numbers."""
        v = self.value(key)
        if not isinstance(v, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in v):
            self.fail(key, f"must be a list of finite numbers, got {v!r}")
        return tuple(float(x) for x in v)

    def section(self, key: str) -> FileFields:
        """The nested object `key`, read the same way."""
        return FileFields(self.value(key), self.arrays, f"{self.prefix}{key}.")

    def footprint(self, key: str) -> str:
        """A footprint name `parse_footprint` accepts (sizes bounded)."""
        name = self.text(key)
        try:
            parse_footprint(name)
        except ValueError as err:
            self.fail(key, f"is not a usable footprint: {err}")
        return name

    def array(self, name: str, shape: tuple[int | None, ...], kind: str = "f") -> np.ndarray:
        """The array `name`, of `shape` (None: any size) and dtype kind "f" (finite floats) or
        "i" (integers)."""
        if name not in self.arrays:
            raise ValueError(f"array {name!r} is missing")
        a = self.arrays[name]
        if a.dtype.kind not in (("i", "u") if kind == "i" else ("f",)) or a.ndim != len(shape) \
                or any(n is not None and n != m for n, m in zip(shape, a.shape, strict=True)):
            want = "x".join("?" if n is None else str(n) for n in shape)
            raise ValueError(f"array {name!r} must be {'integer' if kind == 'i' else 'float'} "
                             f"of shape [{want}], got {a.dtype} of shape {list(a.shape)}")
        if kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"array {name!r} holds NaN or Inf")
        return a

    def threshold(self) -> Threshold | None:
        """The `threshold` object (null: not calibrated yet)."""
        if self.value("threshold") is None:
            return None
        t = self.section("threshold")
        return Threshold(t.number("value"), t.number("fpr", 0.0, 1.0),
                         t.number("achieved_fpr", 0.0, 1.0), t.integer("n_clean", 1))


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
