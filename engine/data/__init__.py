"""Data in and out: image files, the digits splits, named footprints, atomic file writing."""

from frmap.engine.data.digits import SPLITS, DigitsSplit, load_digits_split
from frmap.engine.data.files import atomic_write_bytes, write_json
from frmap.engine.data.footprints import STUDY, parse_footprint
from frmap.engine.data.images import (
    DIGITS_IMAGES,
    IMAGENET_IMAGES,
    ImageFileError,
    ImageSpec,
    decode_image,
    expand_paths,
    load_image,
)

__all__ = [
    "DIGITS_IMAGES",
    "IMAGENET_IMAGES",
    "SPLITS",
    "STUDY",
    "DigitsSplit",
    "ImageFileError",
    "ImageSpec",
    "atomic_write_bytes",
    "decode_image",
    "expand_paths",
    "load_digits_split",
    "load_image",
    "parse_footprint",
    "write_json",
]
