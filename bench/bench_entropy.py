"""pytest-benchmark: local entropy and the response score, scikit-image as the baseline.

Run with `pytest bench --benchmark-only`; each group is one problem, compare within a group.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

from frmap.bench.entropy import bench_image
from frmap.kernels import local_entropy, response_score, set_num_threads

CASES = [
    ("random", (224, 224), 3),
    ("smooth", (224, 224), 3),
    ("random", (224, 224), 7),
    ("random", (1024, 1024), 3),
    ("random", (16, 224, 224), 3),
]
IMPLS = ["skimage", "cpu-1", "cpu-2"]


def _skimage(image: np.ndarray, fp: np.ndarray) -> np.ndarray:
    return np.stack([skimage_entropy(x, fp) for x in image.reshape(-1, *image.shape[-2:])])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("kind", "shape", "radius"), CASES, ids=lambda v: str(v))
def test_local_entropy(benchmark, impl, kind, shape, radius):
    image, fp = bench_image(kind, shape), disk(radius)
    benchmark.group = f"local_entropy {kind} {shape} disk({radius})"
    benchmark.extra_info.update(impl=impl, shape=shape, footprint=f"disk({radius})",
                                pixels=image.size)
    if impl == "skimage":
        benchmark.pedantic(_skimage, args=(image, fp), rounds=3, warmup_rounds=1)
        return
    set_num_threads(int(impl.split("-")[1]))
    try:
        expected = _skimage(image, fp).reshape(shape)
        np.testing.assert_allclose(local_entropy(image, fp, backend="cpu"), expected, atol=1e-9)
        benchmark(local_entropy, image, fp, backend="cpu")
    finally:
        set_num_threads(None)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_response_score(benchmark, backend):
    """The whole metric on a batch of 8 RGB 224x224 response maps."""
    rng = np.random.default_rng(0)
    responses = (rng.standard_normal((8, 3, 224, 224)) * (rng.random((8, 3, 224, 224)) < 0.3))
    responses = responses.astype(np.float32)
    benchmark.group = "response_score 8x3x224x224 square(3)"
    benchmark.extra_info.update(backend=backend)
    benchmark(response_score, responses, np.ones((3, 3)), backend=backend)
