"""scikit-image's own test cases for `rank.entropy`, with `local_entropy` swapped in.

Re-typed from scikit-image's `filters/rank/tests/test_rank.py` (`test_entropy`,
`test_rank_filter` on its float image, `test_compare_ubyte_vs_float_3d`,
`test_compare_8bit_unsigned_vs_signed_3d`, `test_compare_8bit_vs_16bit`,
`test_1d_input_raises_error`), with scikit-image's expectations: exact `==` where it asserts
`==`, `rtol=1e-15` where it does (wider for windows of more than ~32 pixels, where
scikit-image's own rounding exceeds it: `helpers.skimage_rtol`). Where scikit-image compares
against a stored reference file, scikit-image itself computes the expectation. The triton
backend runs the 2-D cases on small crops under the interpreter and must refuse the 3-D ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.filters import rank
from skimage.morphology import ball, disk
from skimage.util import img_as_float, img_as_ubyte

import frmap.kernels as K
from frmap.kernels._dispatch import interpreting

from helpers import skimage_rtol

CPU = pytest.param("cpu", marks=pytest.mark.needs_extension)
TRITON = pytest.param(
    "triton",
    marks=[
        pytest.mark.triton_interpret,
        pytest.mark.skipif(
            not (interpreting() or torch.cuda.is_available()),
            reason="needs CUDA or TRITON_INTERPRET=1",
        ),
    ],
)
PRECISION_LOSS = "Possible precision loss"


def run(backend: str, image: np.ndarray, footprint, **kwargs) -> np.ndarray:
    """local_entropy on `backend`: numpy for cpu, a tensor on the device for triton."""
    if backend == "triton":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        out = kwargs.pop("out", None)
        out_t = None if out is None else torch.from_numpy(out).to(device)
        got = K.local_entropy(tensor, footprint, out=out_t, backend=backend, **kwargs)
        return got.cpu().numpy()
    return K.local_entropy(image, footprint, backend=backend, **kwargs)


def bits_cases():
    """(image, footprint, bits): scikit-image's test_entropy data, 1 to 12 bits a pixel."""
    square16 = np.ones((16, 16), np.uint8)
    tiles = {
        1: np.tile(np.asarray([0, 1]), (100, 100)),
        2: np.tile(np.asarray([[0, 1], [2, 3]]), (10, 10)),
        3: np.tile(np.asarray([[0, 1, 2, 3], [4, 5, 6, 7]]), (10, 10)),
        4: np.tile(np.arange(16).reshape(4, 4), (10, 10)),
        6: np.tile(np.arange(64).reshape(8, 8), (10, 10)),
        8: np.tile(np.arange(256).reshape(16, 16), (10, 10)),
    }
    cases = [(tile.astype(np.uint8), square16, bits) for bits, tile in tiles.items()]
    twelve = np.zeros((65, 65), np.uint16)
    twelve[:64, :64] = np.arange(4096).reshape(64, 64)
    return [*cases, (twelve, np.ones((64, 64), np.uint8), 12)]


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("case", range(7), ids=[f"{b}bits" for *_, b in bits_cases()])
def test_entropy_is_the_bit_depth(backend, case):
    """A window of 2**k equally frequent values has exactly k bits: the maximum is k."""
    image, footprint, bits = bits_cases()[case]
    if backend == "triton":
        if footprint.sum() > 256 and interpreting():
            pytest.skip("a window of 4096 pixels is too slow under the Triton interpreter")
        image = image[:footprint.shape[0], :footprint.shape[1]]  # one full window
    got = run(backend, image, footprint)
    assert got.dtype == np.float64
    assert got.max() == bits, f"max {got.max()!r} != {bits}"


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("out_dtype", [None, np.float32, np.float64])
def test_float_image_as_scikit_image(backend, out_dtype):
    """test_rank_filter's entropy case: the seeded float image, disk(1), rtol 1e-15."""
    image = np.random.RandomState(0).rand(25, 25)
    with pytest.warns(UserWarning, match=PRECISION_LOSS):
        expected = rank.entropy(image, disk(1))
    out = None if out_dtype is None else np.zeros(image.shape, out_dtype)
    with pytest.warns(UserWarning, match=PRECISION_LOSS):
        got = run(backend, image, disk(1), out=out)
    if out_dtype is not None:
        expected = expected.astype(out_dtype)
        assert got.dtype == out_dtype
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)


def _random_volume(low: int, high: int, shape, dtype) -> np.ndarray:
    return np.random.RandomState(0).randint(low, high, size=shape).astype(dtype)


def _uint8_and_float_volumes() -> tuple[np.ndarray, np.ndarray]:
    """test_compare_ubyte_vs_float_3d's volumes: uint8, and the same as float in [0, 1]."""
    volume = _random_volume(0, 256, (10, 20, 30), np.uint8)
    return volume, img_as_float(volume)


def _uint8_and_int8_volumes() -> tuple[np.ndarray, np.ndarray]:
    """test_compare_8bit_unsigned_vs_signed_3d's volumes: int8 in [0, 127), and as uint8."""
    volume = _random_volume(0, 127, (10, 20, 30), np.int8)
    return img_as_ubyte(volume), volume


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize(
    "volumes", [_uint8_and_float_volumes, _uint8_and_int8_volumes],
    ids=["ubyte_vs_float_3d", "8bit_unsigned_vs_signed_3d"],
)
def test_compare_converted_volumes(backend, volumes):
    """A float or signed volume gives the entropy of its uint8 conversion, with a warning."""
    volume_u, volume_other = volumes()
    out_u = K.local_entropy(volume_u, ball(3), backend=backend)
    with pytest.warns(UserWarning, match=PRECISION_LOSS):
        out_other = K.local_entropy(volume_other, ball(3), backend=backend)
    np.testing.assert_array_equal(out_u, out_other)
    expected = rank.entropy(volume_u, ball(3))
    np.testing.assert_allclose(out_u, expected, rtol=skimage_rtol(ball(3)), atol=0)


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_compare_8bit_vs_16bit(backend):
    """The same levels as uint8 (256 bins) and uint16 (max + 1 bins) give the same entropy."""
    image8 = img_as_ubyte(data.camera())[::2, ::2]
    if backend == "triton":
        image8 = image8[:48, :48]
    f8 = run(backend, image8, disk(3))
    np.testing.assert_array_equal(f8, run(backend, image8.astype(np.uint16), disk(3)))
    if backend == "cpu":
        volume8 = _random_volume(128, 256, (10, 10, 10), np.uint8)
        v8 = K.local_entropy(volume8, ball(3), backend=backend)
        np.testing.assert_array_equal(v8, K.local_entropy(volume8.astype(np.uint16), ball(3)))


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_1d_input_raises_error(backend):
    with pytest.raises(ValueError, match=r"shape \[\.\.\., H, W\]"):
        K.local_entropy(np.arange(10), disk(3), backend=backend)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_refuses_3d_footprints(backend):
    volume = torch.zeros((4, 5, 6), dtype=torch.uint8)
    with pytest.raises(ValueError, match="backend 'triton' computes 2-D footprints only"):
        K.local_entropy(volume, ball(1), backend=backend)
