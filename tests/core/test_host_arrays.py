"""The entropy op's output dtype and DLPack arrays, on numpy data (no torch here).

`out_dtype=float32` is the float64 result rounded once, on every host backend; an array known
only through DLPack comes back as its own kind, through its namespace's `from_dlpack`.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import disk

import frmap.kernels as K

from helpers import DLPackArray, NamespacedArray, random_image

BACKENDS = [pytest.param("cpu", marks=pytest.mark.needs_extension), "reference"]


def host_array(data: np.ndarray) -> NamespacedArray:
    return NamespacedArray(data, np.from_dlpack)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_is_float64_rounded_once(backend):
    rng = np.random.default_rng(4)
    images = random_image(rng, (2, 21, 18), np.uint8, 9)
    mask = rng.random((21, 18)) < 0.8
    for fp in (disk(1), disk(4)):
        exact = K.local_entropy(images, fp, mask=mask, backend=backend)
        assert exact.dtype == np.float64
        for dtype in ("float32", np.float32, np.dtype(np.float32)):
            got = K.local_entropy(images, fp, mask=mask, out_dtype=dtype, backend=backend)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, exact.astype(np.float32))
        out = np.empty(images.shape, np.float32)
        assert K.local_entropy(images, fp, mask=mask, out=out, out_dtype="float32",
                               backend=backend) is out
        np.testing.assert_array_equal(out, exact.astype(np.float32))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"out_dtype": "float16"}, "out_dtype must be float32 or float64"),
    ({"out_dtype": "int8"}, "out_dtype must be float32 or float64"),
    ({"out_dtype": object()}, "out_dtype must be float32 or float64"),
    ({"out": np.empty((4, 5), np.float32), "out_dtype": np.float64}, "out is float32"),
])
def test_bad_out_dtype_raises(kwargs, match):
    with pytest.raises(TypeError, match=match):
        K.local_entropy(np.zeros((4, 5), np.uint8), disk(1), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dlpack_host_array_round_trips(backend):
    images = random_image(np.random.default_rng(6), (3, 15, 16), np.uint8, 11)
    got = K.local_entropy(host_array(images), disk(2), out_dtype="float32", backend=backend)
    assert isinstance(got, NamespacedArray)
    np.testing.assert_array_equal(got.data, K.local_entropy(images, disk(2), out_dtype="float32",
                                                            backend=backend))
    means = K.mean_local_entropy(host_array(images), disk(2), mask=host_array(images > 3),
                                 backend=backend)
    assert isinstance(means, NamespacedArray)
    np.testing.assert_array_equal(means.data, K.mean_local_entropy(images, disk(2),
                                                                   mask=images > 3,
                                                                   backend=backend))


def test_dlpack_without_a_namespace_raises():
    with pytest.raises(TypeError, match="image is a DLPack array, but its namespace"):
        K.local_entropy(DLPackArray(np.zeros((4, 4), np.uint8)), disk(1))
