"""Image files in, [0, 1] tensors out: folders, lists and streamed paths, bad files reported."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageSpec:
    """What a model takes: channel count and, for files, how they are brought to size.

    `resize`/`crop` (ImageNet: 256 then centre 224) apply to files of any size; with neither,
    files must already have the model's `size`.
    """

    channels: int
    size: tuple[int, int]
    resize: int | None = None

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


def expand_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, folders as their image files (sorted, recursive), in input order.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder holds no image file.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
            if not files:
                raise ValueError(f"{path}: folder holds no image files ({', '.join(EXTENSIONS)})")
            yield from files
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


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
        ImageFileError: unreadable or corrupt file, wrong colour mode or wrong size.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in ("L", "RGB", "P", "I;16", "1"):
                raise ImageFileError(
                    path, f"{mode} image; the model takes {spec.mode} (convert it first)"
                )
            if mode == "P" and "transparency" in im.info:
                raise ImageFileError(path, "palette image with transparency; convert it first")
            if (spec.channels == 3) != (mode in ("RGB", "P")):
                have = "colour" if mode in ("RGB", "P") else "grayscale"
                want = "RGB" if spec.channels == 3 else "grayscale"
                raise ImageFileError(path, f"{have} image; the model takes {want} images")
            array = np.asarray(im.convert(spec.mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageFileError(path, f"unreadable or corrupt image ({err})") from None
    tensor = torch.from_numpy(array).reshape(size[1], size[0], spec.channels).permute(2, 0, 1)
    if spec.resize is not None:
        tensor = TF.center_crop(TF.resize(tensor, spec.resize, antialias=True), list(spec.size))
        return tensor.clamp(0.0, 1.0).contiguous()
    if tuple(tensor.shape[1:]) != spec.size:
        raise ImageFileError(
            path, f"size {size[0]}x{size[1]}; the model takes {spec.size[1]}x{spec.size[0]}"
        )
    return tensor.contiguous()
