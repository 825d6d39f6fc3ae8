"""Validated reads of a file's JSON settings and arrays, for every file frmap loads.

A hand-edited or hostile file can neither disable detection (a NaN threshold) nor exhaust
memory: numbers must be finite, integers are not booleans, names must be among the known ones,
footprints bounded, arrays of the stated shape and dtype, and each error names the field.
"""

from __future__ import annotations

import math
from typing import NoReturn

import numpy as np

from frmap.engine.data.footprints import parse_footprint
from frmap.engine.detectors.threshold import Threshold


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
