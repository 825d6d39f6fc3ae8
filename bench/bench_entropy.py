"""pytest-benchmark: local entropy and the response score, on the cases of `frmap bench entropy
--quick`, with scikit-image (the reference backend for the score) as the baseline.

Run with `pytest bench --benchmark-only`; each group is one problem, compare within a group.
The cases, the correctness check and the timed calls are those of `frmap.bench.entropy`.
"""

from __future__ import annotations

import pytest

from frmap.bench.entropy import (
    SCORE_BACKENDS,
    bench_image,
    cases,
    check,
    footprint,
    score_call,
    score_responses,
    skimage_stack,
)
from frmap.kernels import local_entropy, set_num_threads

IMPLS = ["skimage", "cpu-1", "cpu-2"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("case", "kind", "shape", "fp_name"), cases(quick=True),
                         ids=lambda v: str(v))
def test_local_entropy(benchmark, impl, case, kind, shape, fp_name):
    image, fp = bench_image(kind, shape), footprint(fp_name)
    benchmark.group = f"local_entropy {case} {kind} {shape} {fp_name}"
    benchmark.extra_info.update(impl=impl, shape=shape, footprint=fp_name, pixels=image.size)
    if impl == "skimage":
        benchmark.pedantic(skimage_stack, args=(image, fp), rounds=3, warmup_rounds=1)
        return
    set_num_threads(int(impl.split("-")[1]))
    try:
        check(image, fp)
        benchmark(local_entropy, image, fp, backend="cpu")
    finally:
        set_num_threads(None)


@pytest.mark.parametrize("backend", SCORE_BACKENDS)
def test_response_score(benchmark, backend):
    """The whole metric on a batch of 8 RGB 224x224 response maps."""
    benchmark.group = "response_score 8x3x224x224 square(3)"
    benchmark.extra_info.update(backend=backend)
    benchmark(score_call(score_responses(), backend))
