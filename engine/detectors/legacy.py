"""The entropy detector's JSON files of frmap 0.1 (`frmap.entropy-detector/1`), read as the
document of a `frmap.detector/2` file so that they still load."""

from __future__ import annotations

import json
from pathlib import Path


def entropy_detector_meta(path: Path, raw: bytes, fmt: str) -> dict:
    """The meta document of an entropy detector JSON file of frmap 0.1."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a detector file (invalid JSON: {err})") from None
    if not isinstance(data, dict) or data.pop("format", None) != "frmap.entropy-detector/1":
        raise ValueError(f"{path}: not a detector file (format is not {fmt})")
    threshold = {k: data.pop(k, None) for k in ("fpr", "achieved_fpr", "n_clean")}
    return {"kind": "entropy", **data, "threshold": {"value": data.pop("threshold", None),
                                                     **threshold}}
