"""Loading image files: sizes, colour modes, corrupt files, folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frmap.engine.data.images import (
    DIGITS_IMAGES,
    EXTENSIONS,
    IMAGENET_IMAGES,
    ImageFileError,
    expand_paths,
    load_image,
)


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_digits_image_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    t = load_image(_save(tmp_path / "a.png", array), DIGITS_IMAGES)
    assert t.shape == (1, 32, 32) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0].numpy(), array / 255.0, atol=1e-7)


def test_imagenet_resize_and_centre_crop(tmp_path):
    yy, xx = np.mgrid[0:300, 0:400]
    smooth = np.stack([xx / 400, yy / 300, 0.5 + 0.5 * np.sin(xx / 30.0)], axis=-1)
    array = (smooth * 255).astype(np.uint8)
    t = load_image(_save(tmp_path / "a.png", array), IMAGENET_IMAGES)
    assert t.shape == (3, 224, 224)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    # independent oracle: PIL resize (shorter side 256) and a centre crop of 224
    im = Image.fromarray(array).resize((341, 256), Image.BILINEAR)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255
    assert np.abs(t.permute(1, 2, 0).numpy() - crop).max() < 0.02


@pytest.mark.parametrize(
    ("make", "spec", "match"),
    [
        (lambda p: _save(p, np.zeros((32, 32, 4), np.uint8), "RGBA"), IMAGENET_IMAGES,
         "RGBA image"),
        (lambda p: _save(p, np.zeros((32, 32), np.uint8)), IMAGENET_IMAGES, "grayscale image"),
        (lambda p: _save(p, np.zeros((32, 32, 3), np.uint8)), DIGITS_IMAGES, "colour image"),
        (lambda p: _save(p, np.zeros((28, 30), np.uint8)), DIGITS_IMAGES, "size 30x28"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), DIGITS_IMAGES,
         "unreadable or corrupt"),
        (lambda p: p.write_text("not an image"), DIGITS_IMAGES, "unreadable or corrupt"),
    ],
)
def test_bad_files_name_the_file_and_problem(tmp_path, make, spec, match):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageFileError, match=match) as info:
        load_image(path, spec)
    assert str(path) in str(info.value)


def test_truncated_png_is_reported(tmp_path):
    good = _save(tmp_path / "good.png", np.zeros((32, 32), np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match="cut.png: unreadable or corrupt"):
        load_image(tmp_path / "cut.png", DIGITS_IMAGES)


def test_expand_paths(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.png", "d/a.png", "d/sub/c.jpg", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "x.png"
    single.write_bytes(b"")
    got = list(expand_paths([single, tmp_path / "d"]))
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "x.png", "d/a.png", "d/b.png", "d/sub/c.jpg"
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    got = list(expand_paths([tmp_path / "empty", tmp_path / "missing.png", single,
                             tmp_path / "loop.png"]))
    assert [str(e) if isinstance(e, ImageFileError) else e for e in got] == [
        f"{tmp_path / 'empty'}: folder holds no image files ({', '.join(EXTENSIONS)})",
        f"{tmp_path / 'missing.png'}: no such file or folder",
        single,
        f"{tmp_path / 'loop.png'}: broken symbolic link or symbolic link loop",
    ]
