"""The `.npz` archives frmap writes: arrays plus one JSON document under the key `meta`.

Read with `allow_pickle=False`: nothing in an archive can run code. Every archive records the
versions of frmap, numpy and torch that wrote it (`versions`).
"""

from __future__ import annotations

import io
import json
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from frmap.engine.data.files import atomic_write_bytes


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
    raw = read_bytes(path, what) if raw is None else raw
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


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None


def versions() -> dict[str, str]:
    """The versions of frmap, numpy and torch, recorded in every file frmap writes."""
    try:
        frmap = version("frmap")
    except PackageNotFoundError:
        frmap = "unknown"
    return {"frmap": frmap, "numpy": np.__version__, "torch": torch.__version__}
