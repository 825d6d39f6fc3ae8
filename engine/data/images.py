"""Image files in, [0, 1] tensors out: folders, lists and streamed paths, bad files reported.

What is read: single-frame PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM files in RGB, grayscale
(8-bit, 1-bit, 16-bit: scaled by 1/65535, not clipped), or palette mode (a palette of grays
counts as grayscale). The size in the header is checked before any pixel is decoded: images
above `ImageSpec.max_pixels` (default `MAX_PIXELS`, 40 megapixels; PIL refuses files of
more than about 179 million pixels whatever the limit) are refused, as are
multi-frame files (animated GIF, multi-page TIFF) rather than silently reading one frame.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

# Default limit on width x height of an image file (`ImageSpec.max_pixels`, `--max-pixels`).
MAX_PIXELS = 40_000_000
_GRAY16 = ("I;16", "I;16B", "I;16L", "I")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageSpec:
    """What a model takes: channel count and, for files, how they are brought to size.

    `resize`/`crop` (ImageNet: 256 then centre 224) apply to files of any size; with neither,
    files must already have the model's `size`. Files of more than `max_pixels` pixels are
    refused from their header, before decoding.
    """

    channels: int
    size: tuple[int, int]
    resize: int | None = None
    max_pixels: int = MAX_PIXELS

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


IMAGENET_IMAGES = ImageSpec(channels=3, size=(224, 224), resize=256)
DIGITS_IMAGES = ImageSpec(channels=1, size=(32, 32))


class ImageFileError(ValueError):
    """A file that cannot be used, with the reason."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def expand_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[Path | ImageFileError]:
    """Files as given, folders as their image files (sorted, recursive), in input order.

    A path that cannot be used (missing, a broken link or link loop, not a regular file, an
    unreadable folder or one without image files) comes as an `ImageFileError` in its place,
    so that the caller can report it and go on with the rest.
    """
    for item in inputs:
        path = Path(item)
        try:
            if path.is_dir():
                if not os.access(path, os.R_OK | os.X_OK):
                    yield ImageFileError(path, "folder cannot be read (permission denied)")
                    continue
                files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
                if not files:
                    yield ImageFileError(path, "folder holds no image files "
                                               f"({', '.join(EXTENSIONS)})")
                yield from files
            elif path.is_file():
                yield path
            elif path.is_symlink():
                yield ImageFileError(path, "broken symbolic link or symbolic link loop")
            elif path.exists():
                yield ImageFileError(path, "not a regular file or folder")
            else:
                yield ImageFileError(path, "no such file or folder")
        except OSError as err:
            yield ImageFileError(path, f"cannot be read ({err.strerror or err})")


def decode_image(data: bytes, spec: ImageSpec, name: str = "image") -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) as `load_image` reads a file; errors name `name`.

    Raises:
        ImageFileError: undecodable bytes, wrong colour mode or wrong size.
    """
    try:
        return load_image(io.BytesIO(data), spec)
    except ImageFileError as err:
        raise ImageFileError(Path(name), err.problem) from None


def load_image(path: Path | BinaryIO, spec: ImageSpec) -> torch.Tensor:
    """One file as a [C, H, W] float32 tensor in [0, 1] for a model described by `spec`.

    Raises:
        ImageFileError: unreadable, corrupt or not a regular file; too many pixels; several
            frames; wrong colour mode or wrong size.
    """
    try:
        with warnings.catch_warnings():
            # the limit is ours (`max_pixels`); PIL's own error stays, at twice its warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > spec.max_pixels:
                    raise ImageFileError(path, f"{width}x{height} is {width * height} pixels, "
                                               f"above the limit of {spec.max_pixels} "
                                               "(--max-pixels)")
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    raise ImageFileError(path, f"{frames} frames; frmap reads single images "
                                               "(save the frame to score as a file of its own)")
                im.load()
                array = _pixels(path, im, spec)
    except ImageFileError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageFileError(path, f"too many pixels ({err})") from None
    except Exception as err:  # noqa: BLE001 - anything a hostile file makes the decoder raise
        raise ImageFileError(path, f"unreadable or corrupt image ({type(err).__name__}: {err})"
                             ) from None
    tensor = torch.from_numpy(array).reshape(height, width, spec.channels).permute(2, 0, 1)
    if spec.resize is not None:
        tensor = TF.center_crop(TF.resize(tensor, spec.resize, antialias=True), list(spec.size))
        return tensor.clamp(0.0, 1.0).contiguous()
    if tuple(tensor.shape[1:]) != spec.size:
        raise ImageFileError(
            path, f"size {width}x{height}; the model takes {spec.size[1]}x{spec.size[0]}"
        )
    return tensor.contiguous()


def _pixels(path: Path, im: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The decoded image as float32 in [0, 1], [H, W] or [H, W, 3] as the model takes."""
    mode = im.mode
    gray = mode in ("L", "1", *_GRAY16) or (mode == "P" and _gray_palette(im))
    if not gray and mode not in ("RGB", "P"):
        raise ImageFileError(path, f"{mode} image; the model takes {spec.mode} (convert it first)")
    if mode == "P" and "transparency" in im.info:
        raise ImageFileError(path, "palette image with transparency; convert it first")
    if (spec.channels == 3) == gray:
        have, want = ("grayscale", "RGB") if gray else ("colour", "grayscale")
        raise ImageFileError(path, f"{have} image; the model takes {want} images")
    if mode in _GRAY16:
        values = np.asarray(im)
        if values.min() < 0 or values.max() > 65535:
            raise ImageFileError(path, f"{mode} image with values outside 0..65535")
        return values.astype(np.float32) / 65535.0
    return np.asarray(im.convert(spec.mode), dtype=np.float32) / 255.0


def _gray_palette(im: Image.Image) -> bool:
    """True when every colour a palette image uses is a gray (r == g == b)."""
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(im))
    return bool(used.max() < len(palette)) and bool(
        (palette[used] == palette[used][:, :1]).all())
