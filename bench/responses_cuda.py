"""`frmap bench responses --device cuda`: the response engine vs Captum on one GPU.

Full: VGG19 with random weights (seed 0) at 224x224, batch 1, 8 and 64; quick: VGG11 at 64x64,
batch 4. Methods as in `frmap bench responses` (`frmap.bench.responses.METHODS`: the reverse
walk in float32 and bf16, the autograd path, Captum's GuidedBackprop), all on the GPU, with
images already there:

- Correctness, once per batch before timing: every method against Captum in float64 on the
  same GPU, with the CPU benchmark's bounds (`frmap.bench.responses.accuracy`).
- Speed: images per second from CUDA events, the median of `Setup.repeats` calls after two
  warm-up calls (which also compile the Triton kernels); the methods take turns in each round.
- Memory: `torch.cuda.max_memory_allocated` during one call, minus what was allocated before it
  (the model and the images): the memory of the responses beyond the weights.
- Screening: end-to-end `ResponseEngine.scores` (responses and the fused 3x3 Triton score) of
  the reverse walk in float32 and bf16, images per second, timed the same way.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

import frmap.bench.machine as machine
from frmap.bench.responses import (
    ENGINE_METHODS,
    METHODS,
    Setup,
    accuracy,
    add_ratios,
    bench_images,
    error_lines,
    row_lines,
    runner,
)
from frmap.engine.models import load_vgg, torch_settings
from frmap.engine.responses import ResponseEngine

SCREENING = ("reverse_walk", "reverse_walk_bf16")


# threads: the host's, for what runs there (the model's initialisation); the peak memory of one
# call on the GPU does not vary: measured once.
FULL = Setup("vgg19", 224, (1, 8, 64), threads=os.cpu_count() or 1, repeats=10, memory_repeats=1)
QUICK = Setup("vgg11", 64, (4,), threads=os.cpu_count() or 1, repeats=3, memory_repeats=1)


def unavailable_reason() -> str | None:
    """Why the CUDA rows cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import captum  # noqa: F401
    except ImportError as err:
        return f"captum is not installed ({err})"
    return None


def cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of one `fn()` on the current CUDA stream, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during `fn()` beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run(quick: bool = False) -> dict:
    """Measure every method at every batch size, or say why the rows are skipped here.

    Returns:
        {"skipped": reason or None, "setup", "rows", "screening", "errors_vs_float64",
        "machine"}; rows and screening are empty when skipped.
    """
    setup = QUICK if quick else FULL
    result = {"skipped": unavailable_reason(), "setup": asdict(setup), "rows": [],
              "screening": [], "errors_vs_float64": [], "machine": machine.describe()}
    if result["skipped"]:
        return result
    with torch_settings(setup.threads):
        model = load_vgg(setup.arch, seed=0).cuda()
    footprint = np.ones((3, 3), dtype=bool)
    for batch in setup.batches:
        x = bench_images(batch, setup.size).cuda()
        runs = {m: runner(model, m, batch) for m in METHODS}
        outs = {m: runs[m](x) for m in METHODS}
        result["errors_vs_float64"].append({"batch": batch, **accuracy(model, x, outs)})
        del outs
        for m in METHODS:
            call = functools.partial(runs[m], x)
            seconds = cuda_seconds(call, setup.repeats)
            peak = statistics.median(peak_mib(call) for _ in range(setup.memory_repeats))
            result["rows"].append({"method": m, "batch": batch, "seconds": seconds,
                                   "images_per_s": batch / seconds, "peak_mib": peak})
        for m in SCREENING:
            path, precision = ENGINE_METHODS[m]
            engine = ResponseEngine(model, path=path, precision=precision, batch_size=batch)
            seconds = cuda_seconds(functools.partial(engine.scores, x, footprint), setup.repeats)
            result["screening"].append({"method": m, "batch": batch, "seconds": seconds,
                                        "images_per_s": batch / seconds})
        del runs, call, engine
    add_ratios(result["rows"])
    return result


def table(result: dict) -> str:
    """The rows, the screening throughput and the errors; or why the rows were skipped."""
    if result["skipped"]:
        return f"CUDA rows skipped: {result['skipped']}"
    s = result["setup"]
    lines = [f"{s['arch']} {s['size']}x{s['size']} on {result['machine']['cuda']}, guided "
             f"conv_max, CUDA events, median of {s['repeats']}", *row_lines(result["rows"]), ""]
    for r in result["screening"]:
        lines.append(f"screening (responses + fused score) {r['method']:17} batch "
                     f"{r['batch']:>3}: {r['images_per_s']:9.1f} img/s")
    lines += [*error_lines(result["errors_vs_float64"]), "", machine.summary(result["machine"])]
    return "\n".join(lines)
