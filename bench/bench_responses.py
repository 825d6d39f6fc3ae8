"""pytest-benchmark: guided conv_max responses of VGG19, the engine's two paths vs Captum.

Run with `pytest bench/bench_responses.py --benchmark-only`; each group is one batch size, with
Captum's GuidedBackprop as the baseline. Peak memory needs fresh processes: `frmap bench
responses` measures it.
"""

from __future__ import annotations

import pytest
import torch

from frmap.bench.responses import FULL, METHODS, accuracy, bench_images, runner
from frmap.engine.models import load_vgg, torch_settings


@pytest.fixture(scope="module")
def vgg():
    with torch_settings(FULL.threads):
        yield load_vgg(FULL.arch, seed=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", FULL.batches)
def test_responses(benchmark, vgg, batch, method):
    x = bench_images(batch, FULL.size)
    run = runner(vgg, method, batch)
    # as accurate as float32 Captum, both against Captum in float64 (see frmap bench responses)
    accuracy(vgg, x, {method: run(x), "captum": runner(vgg, "captum", batch)(x)})
    benchmark.group = f"responses {FULL.arch} {FULL.size}x{FULL.size} batch {batch}"
    benchmark.extra_info.update(method=method, batch=batch, threads=FULL.threads,
                                torch=torch.__version__, images=batch)
    benchmark.pedantic(run, args=(x,), rounds=2, warmup_rounds=1)
