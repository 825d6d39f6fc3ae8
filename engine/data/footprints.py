"""Named footprints for the entropy window: `square3`, `disk2`, `diamond1`, `rect3x5`.

Sizes are bounded (`MAX_FOOTPRINT_SIDE`: at most 65 pixels a side, a disk or diamond radius of
at most 32), so a name read from a file cannot ask for an unbounded allocation, and a footprint must
hold at least two pixels (a one-pixel window has zero entropy everywhere).
"""

from __future__ import annotations

import re

import numpy as np
from skimage.morphology import diamond, disk

# The footprints of the footprint study (METHOD: the paper's "3x3" cannot reach its 4.4 bits).
STUDY = ("square3", "square5", "disk2", "disk3", "disk5")

# The largest side of a named footprint (a disk or diamond of radius 32 is 65 pixels wide).
MAX_FOOTPRINT_SIDE = 65

_PATTERN = re.compile(r"^(square|disk|diamond)(\d{1,6})$|^rect(\d{1,6})x(\d{1,6})$")


def parse_footprint(name: object) -> np.ndarray:
    """The binary footprint a name stands for.

    `squareN`: N x N ones; `diskR` / `diamondR`: skimage's disk / diamond of radius R;
    `rectHxW`: H x W ones. Sides run up to `MAX_FOOTPRINT_SIDE` (radii up to half of it), and
    the footprint must hold at least two pixels.

    Raises:
        ValueError: the name is not a string of one of these forms, or its size is out of range.
    """
    m = _PATTERN.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(
            f"unknown footprint {name!r}: use squareN, diskR, diamondR or rectHxW (e.g. disk2)"
        )
    kind, size, h, w = m.groups()
    if kind in ("disk", "diamond"):
        shape = (2 * int(size) + 1,) * 2
    else:
        shape = (int(h), int(w)) if kind is None else (int(size), int(size))
    if max(shape) > MAX_FOOTPRINT_SIDE:
        raise ValueError(f"footprint {name!r} is too large: at most {MAX_FOOTPRINT_SIDE} pixels "
                         f"a side (radius {MAX_FOOTPRINT_SIDE // 2})")
    if kind in ("disk", "diamond"):
        footprint = (disk if kind == "disk" else diamond)(int(size)).astype(np.uint8)
    else:
        footprint = np.ones(shape, np.uint8)
    if np.count_nonzero(footprint) < 2:
        raise ValueError(f"footprint {name!r} holds {np.count_nonzero(footprint)} pixel(s); "
                         "the entropy of a window needs at least two (e.g. square3, disk1)")
    return footprint
