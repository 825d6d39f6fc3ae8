"""scikit-image's input rules for `filters.rank`, in numpy: dtype conversion and shifted footprints.

`rank.entropy` computes on uint8 or uint16 images; any other dtype is converted with
`img_as_ubyte` after a "Possible precision loss" UserWarning (its `_preprocess_input` /
`_handle_input_3D`). `shift_x`, `shift_y`, `shift_z` move the footprint's centre from
`(d // 2, h // 2, w // 2)` (in scikit-image's axis order, see `shifted_footprint`); here the
footprint is padded with zeros so that the shifted centre becomes the padded footprint's
centre, and every backend gets shifts for free.
"""

from __future__ import annotations

import operator
import warnings

import numpy as np

from ._arrays import footprint_array

RANK_DTYPES = ("uint8", "uint16")


def as_rank_image(image: np.ndarray, volume: bool, name: str = "image") -> np.ndarray:
    """`image` as `rank.entropy` computes on it: uint8/uint16 unchanged, others as uint8.

    Args:
        image: any numpy integer, bool or float array.
        volume: whether the footprint is 3-D (scikit-image refuses bool images only in 2-D).
        name: the argument's name, for errors and warnings.

    Raises:
        ValueError: bool image with a 2-D footprint; float values outside [-1, 1].
        TypeError: a dtype scikit-image cannot convert.
    """
    dtype = image.dtype
    if dtype.name in RANK_DTYPES:
        return image
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise TypeError(f"{name} must be a bool, integer or float array, got {dtype}")
    if dtype.kind == "b" and not volume:
        raise ValueError(f"{name} dtype cannot be bool with a 2-D footprint (as in scikit-image)")
    warnings.warn(
        f"Possible precision loss converting {name} of type {dtype} to uint8 as required by "
        "rank filters. Convert manually using skimage.util.img_as_ubyte to silence this warning.",
        UserWarning,
        stacklevel=4,
    )
    return img_as_ubyte(image, name)


def img_as_ubyte(image: np.ndarray, name: str = "image") -> np.ndarray:
    """scikit-image's `img_as_ubyte` (scale and round or shift, negatives to 0), in numpy.

    bool -> 0 / 255; float in [-1, 1] -> rint(x * 255) clipped to [0, 255], multiplied in the
    input's own float type; an integer type of b value bits (b = 7 for int8) -> its top 8 bits
    (int8: `x * 129 // 64`), except that values all below 256 are kept as they are (with
    scikit-image's "Downcasting" warning); negative values -> 0.
    """
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.uint8) * np.uint8(255)
    if kind == "f":
        if image.size and (image.min() < -1.0 or image.max() > 1.0):
            raise ValueError(f"{name} of type float must be between -1 and 1")
        scaled = np.multiply(image, 255, dtype=image.dtype)
        np.rint(scaled, out=scaled)
        return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)
    bits = 8 * image.dtype.itemsize - (kind == "i")
    if bits < 8:  # int8: widen 7 bits to 14 by repetition, keep the top 8
        scaled = image.astype(np.int16) * np.int16(129) // np.int16(64)
    elif (top := image.max() if image.size else 0) < 256:
        warnings.warn(
            f"Downcasting {image.dtype} to uint8 without scaling because max value {top} "
            "fits in uint8",
            UserWarning,
            stacklevel=5,
        )
        scaled = image
    else:
        scaled = image // image.dtype.type(2 ** (bits - 8))
    return np.maximum(scaled, 0).astype(np.uint8)


def rank_footprint(footprint: object, shifts: tuple[int, int, int]) -> np.ndarray:
    """The validated 2-D or 3-D footprint (uint8), padded for `shifts` (`shifted_footprint`)."""
    return shifted_footprint(footprint_array(footprint, ndims=(2, 3)), shifts)


def shifted_footprint(footprint: np.ndarray, shifts: tuple[int, int, int]) -> np.ndarray:
    """The footprint zero-padded so that its centre is the one shifted by `shifts`.

    scikit-image's axes: for [h, w], shift_y moves the row and shift_x the column; for
    [d, h, w], shift_x moves the plane, shift_y the row and shift_z the column.

    Args:
        footprint: [h, w] or [d, h, w] uint8.
        shifts: (shift_x, shift_y, shift_z).

    Raises:
        ValueError: a shifted centre outside the footprint, or shift_z with a 2-D footprint.
    """
    shift = dict(zip(("shift_x", "shift_y", "shift_z"), map(operator.index, shifts), strict=True))
    if footprint.ndim == 2 and shift["shift_z"] != 0:
        raise ValueError(f"shift_z needs a 3-D footprint, got shape {footprint.shape}")
    names = ("shift_y", "shift_x") if footprint.ndim == 2 else ("shift_x", "shift_y", "shift_z")
    pads = []
    for name, size in zip(names, footprint.shape, strict=True):
        centre = size // 2 + shift[name]
        if not 0 <= centre < size:
            raise ValueError(
                f"{name}={shift[name]} moves the centre to {centre}, outside the footprint's "
                f"{size} elements on that axis (bounds {-(size // 2)} to {size - 1 - size // 2})"
            )
        radius = max(centre, size - 1 - centre)
        pads.append((radius - centre, radius - (size - 1 - centre)))
    return np.ascontiguousarray(np.pad(footprint, pads))
