"""Named footprints for the entropy window: `square3`, `disk2`, `diamond1`, `rect3x5`."""

from __future__ import annotations

import re

import numpy as np
from skimage.morphology import diamond, disk

# The footprints of the footprint study (METHOD: the paper's "3x3" cannot reach its 4.4 bits).
STUDY = ("square3", "square5", "disk2", "disk3", "disk5")

_PATTERN = re.compile(r"^(square|disk|diamond)(\d+)$|^rect(\d+)x(\d+)$")


def parse_footprint(name: str) -> np.ndarray:
    """The binary footprint a name stands for.

    `squareN`: N x N ones; `diskR` / `diamondR`: skimage's disk / diamond of radius R;
    `rectHxW`: H x W ones.

    Raises:
        ValueError: the name is not of one of these forms.
    """
    m = _PATTERN.match(name)
    if not m:
        raise ValueError(
            f"unknown footprint {name!r}: use squareN, diskR, diamondR or rectHxW (e.g. disk2)"
        )
    kind, size, h, w = m.groups()
    if kind is None:
        shape = (int(h), int(w))
    elif kind == "square":
        shape = (int(size), int(size))
    else:
        return (disk if kind == "disk" else diamond)(int(size)).astype(np.uint8)
    if min(shape) < 1:
        raise ValueError(f"footprint {name!r} is empty")
    return np.ones(shape, np.uint8)
