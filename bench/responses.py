"""`frmap bench responses`: the response engine's paths vs Captum's GuidedBackprop.

Full: VGG19 with random weights (seed 0), 224x224 images, batch 1 and 8, 2 intra-op threads;
`--model resnet50` (or resnet18): the residual network at 224x224, batch 8; quick (a CI smoke test,
no targets): VGG11 (ResNet-18) at 64x64, batch 4, once. Every method computes the same responses
(guided rule, target conv_max = the last ReLU after a convolution: VGG19's features[35], a ResNet's
last block's output; ImageNet normalisation inside the model): the reverse walk in float32 and in
bf16 (`precision="bf16"`), the autograd path, Captum. Before timing, each is compared with Captum
run in float64: at VGG19's depth a float32 rounding difference can flip a ReLU mask or a max-pool
argmax, so float32 responses (Captum's too) differ from float64 ones by up to about 1e-2 of their
maximum; a float32 engine path must be as accurate as float32 Captum (relative L2 error at most
twice Captum's, or 1e-5), the bf16 walk within `BF16_L2` relative L2 error.

- Speed: images per second, the best of a few repeats after a warm-up; the methods take turns
  in every round, so a busy machine slows them alike.
- Memory: every (method, batch) runs once in a fresh process; peak RSS (VmHWM, reset through
  /proc/self/clear_refs) minus the RSS once the model and the images are loaded: the memory of
  the responses beyond the weights. It includes what the allocator keeps of freed blocks,
  which varies from run to run: the median of a few processes is reported.
- Share outside the convolutions: of the engine's end-to-end `scores` (responses and the fused
  3x3 score), 1 - (time inside aten::convolution and aten::convolution_backward) / (wall
  time), both from one run under torch.profiler; the median of a few runs.
"""

from __future__ import annotations

import copy
import importlib.util
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import frmap.bench.machine as machine
from frmap.engine.models import Normalized, load_vgg, torch_settings
from frmap.engine.responses import ResponseEngine
from frmap.engine.responses.targets import conv_max_index
from frmap.engine.responses.tracing import conv_max_op, trace_ops

# the networks `--model` takes (random weights, seed 0)
MODELS = ("vgg19", "resnet18", "resnet50")

# method -> (engine path, precision); "captum" is Captum's GuidedBackprop
ENGINE_METHODS = {"reverse_walk": ("reverse_walk", "float32"),
                  "reverse_walk_bf16": ("reverse_walk", "bf16"),
                  "autograd": ("autograd", "float32")}
METHODS = (*ENGINE_METHODS, "captum")
FLOAT32_PATHS = ("reverse_walk", "autograd")
# The bf16 walk's bound on the relative L2 error of its responses against float64 Captum.
BF16_L2 = 0.1
_CONV_OPS = ("aten::convolution", "aten::convolution_backward")


@dataclass(frozen=True)
class Setup:
    """What one benchmark run measures."""

    arch: str
    size: int
    batches: tuple[int, ...]
    threads: int
    repeats: int
    memory_repeats: int


FULL = Setup("vgg19", 224, (1, 8), threads=2, repeats=3, memory_repeats=3)
QUICK = Setup("vgg11", 64, (4,), threads=2, repeats=1, memory_repeats=1)
FULL_RESNET = Setup("resnet50", 224, (8,), threads=2, repeats=3, memory_repeats=3)


def setup_for(model: str, quick: bool) -> Setup:
    """The run `frmap bench responses [--model model] [--quick]` measures."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if model.startswith("vgg"):
        return QUICK if quick else FULL
    return replace(QUICK, arch="resnet18") if quick else replace(FULL_RESNET, arch=model)


def load_network(arch: str) -> nn.Module:
    """A torchvision VGG or ResNet with random weights drawn from seed 0, in eval mode."""
    if arch.startswith("vgg"):
        return load_vgg(arch, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.get_model(arch).eval()


def bench_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] uniform images in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _ChannelMaxSum(nn.Module):
    """conv_max as a module: sum over positions of the channel-wise maximum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.max(dim=1).values.sum((1, 2))


class _ConvMaxOf(nn.Module):
    """conv_max of a network whose target layer is not a prefix of a chain (a ResNet's last
    ReLU, a module called several times: its last output)."""

    def __init__(self, net: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.net, self.layer = net, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = []
        handle = self.layer.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            self.net(x)
        finally:
            handle.remove()
        return _ChannelMaxSum()(seen[-1])


def runner(model: nn.Module, method: str, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> guided conv_max responses of a torchvision VGG or ResNet, by `method` (see
    `METHODS`)."""
    if method != "captum":
        path, precision = ENGINE_METHODS[method]
        return ResponseEngine(model, path=path, precision=precision, batch_size=batch).responses
    from captum.attr import GuidedBackprop

    if hasattr(model, "features"):
        features = model.features[:conv_max_index(list(model.features)) + 1]
        attribution = GuidedBackprop(nn.Sequential(Normalized(features), _ChannelMaxSum()))
    else:
        # Captum's ReLU hooks refuse in-place ReLUs: a copy with out-of-place ones
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        net = Normalized(model)
        traced = trace_ops(net)
        layer = traced.ops[conv_max_op(traced.ops)].module
        attribution = GuidedBackprop(_ConvMaxOf(net, layer))

    def run(x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum announces its ReLU hooks on every call
            return attribution.attribute(x)

    return run


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _peak_memory(setup: Setup, method: str, batch: int) -> float:
    """In a fresh process: peak RSS of one call beyond the loaded model and images (MiB)."""
    torch.set_num_threads(setup.threads)
    model = load_network(setup.arch)
    x = bench_images(batch, setup.size)
    run = runner(model, method, batch)
    baseline = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    run(x)
    return _status_mb("VmHWM") - baseline


def _in_fresh_process(fn: Callable, *args: object):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def accuracy(model: nn.Module, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> dict:
    """Max and L2 relative errors of each method's responses `outs` against Captum in float64.

    Raises:
        RuntimeError: a float32 engine path is less accurate than float32 Captum, or the bf16
            walk is off by more than `BF16_L2` (see above).
    """
    truth = runner(copy.deepcopy(model).double(), "captum", len(x))(x.double())
    errors = {}
    for m, out in outs.items():
        diff = out.double() - truth
        errors[m] = {"max_rel": float(diff.abs().max() / truth.abs().max()),
                     "l2_rel": float(diff.norm() / truth.norm())}
    for m in FLOAT32_PATHS:
        if m in errors and errors[m]["l2_rel"] > max(2 * errors["captum"]["l2_rel"], 1e-5):
            raise RuntimeError(f"{m} is less accurate than Captum: {errors}")
    if "reverse_walk_bf16" in errors and errors["reverse_walk_bf16"]["l2_rel"] > BF16_L2:
        raise RuntimeError(f"the bf16 walk is off by more than {BF16_L2}: {errors}")
    return errors


def _conv_share(engine: ResponseEngine, x: torch.Tensor, repeats: int) -> dict:
    """Wall time of `engine.scores` and the time of its convolutions: the median of `repeats`.

    Each run is timed under the profiler, which only sees the convolutions and a few hundred
    other ops (the walk's own kernels are single calls), so it adds little to the wall time.
    """
    footprint = np.ones((3, 3), dtype=bool)
    engine.scores(x, footprint)  # warm-up, and the engine's one-off check of its path
    runs = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            engine.scores(x, footprint)
            wall = time.perf_counter() - start
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.name in _CONV_OPS)
        conv, end = 0.0, float("-inf")
        for lo, hi in spans:  # union of the spans, in microseconds
            conv += max(0.0, hi - max(lo, end))
            end = max(end, hi)
        runs.append({"method": engine.path, "batch": len(x), "wall_s": wall,
                     "conv_s": conv / 1e6, "outside_share": max(0.0, 1 - conv / 1e6 / wall)})
    return sorted(runs, key=lambda r: r["outside_share"])[len(runs) // 2]


def run(quick: bool = False, model: str = "vgg19") -> dict:
    """Time, check and measure every method at every batch size; return rows and targets."""
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("the memory measurement needs Linux (/proc/self/clear_refs)")
    if importlib.util.find_spec("captum") is None:
        raise RuntimeError("frmap bench responses compares against Captum, which is not "
                           "installed: pip install captum (or frmap[test])")
    setup = setup_for(model, quick)
    with torch_settings(setup.threads):
        model = load_network(setup.arch)
        rows, errors, shares = [], [], []
        for batch in setup.batches:
            x = bench_images(batch, setup.size)
            runs = {m: runner(model, m, batch) for m in METHODS}
            outs = {m: runs[m](x) for m in METHODS}  # warm-up and correctness
            errors.append({"batch": batch, **accuracy(model, x, outs)})
            del outs
            best = dict.fromkeys(METHODS, float("inf"))
            for _ in range(setup.repeats):
                for m in METHODS:
                    start = time.perf_counter()
                    runs[m](x)
                    best[m] = min(best[m], time.perf_counter() - start)
            del runs
            for m in METHODS:
                peak = statistics.median(_in_fresh_process(_peak_memory, setup, m, batch)
                                         for _ in range(setup.memory_repeats))
                rows.append({"method": m, "batch": batch, "seconds": best[m],
                             "images_per_s": batch / best[m], "peak_mib": peak})
            shares += [_conv_share(ResponseEngine(model, path=m, batch_size=batch), x,
                                   setup.repeats) for m in FLOAT32_PATHS]
    add_ratios(rows)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"setup": asdict(setup), "weights_mib": weights, "rows": rows,
            "errors_vs_float64": errors, "conv_share": shares,
            "targets": [] if quick else _targets(rows, shares, max(setup.batches), setup.arch),
            "machine": machine.describe()}


def add_ratios(rows: list[dict]) -> None:
    """Add each row's speed and memory relative to Captum's row of the same batch."""
    for r in rows:
        captum = next(c for c in rows if c["method"] == "captum" and c["batch"] == r["batch"])
        r["speed_vs_captum"] = r["images_per_s"] / captum["images_per_s"]
        r["memory_vs_captum"] = r["peak_mib"] / captum["peak_mib"]


def _targets(rows: list[dict], shares: list[dict], batch: int, arch: str) -> list[dict]:
    walk = [r for r in rows if r["method"] == "reverse_walk"]
    # a ResNet's walk is held to 1.5x Captum's speed and 0.3x its memory; a VGG's to 1x, 0.25x
    speed, most = (1.0, 0.25) if arch.startswith("vgg") else (1.5, 0.3)
    out = [{"target": f"reverse walk speed / Captum, batch {r['batch']}",
            "value": r["speed_vs_captum"], "goal": f">= {speed}",
            "ok": r["speed_vs_captum"] >= speed} for r in walk]
    memory = next(r["memory_vs_captum"] for r in walk if r["batch"] == batch)
    out.append({"target": f"reverse walk peak memory beyond the weights / Captum, batch {batch}",
                "value": memory, "goal": f"<= {most}", "ok": memory <= most})
    bf16 = next(r for r in rows if r["method"] == "reverse_walk_bf16" and r["batch"] == batch)
    speedup = bf16["images_per_s"] / next(r["images_per_s"] for r in walk if r["batch"] == batch)
    out.append({"target": f"bf16 reverse walk speed / float32, batch {batch}", "value": speedup,
                "goal": ">= 1.5", "ok": speedup >= 1.5})
    if arch.startswith("vgg"):  # a ResNet's 1x1 convolutions run as matrix products
        share = next(s["outside_share"] for s in shares
                     if s["method"] == "reverse_walk" and s["batch"] == batch)
        out.append({"target": f"share of reverse-walk scores time outside the convolutions, "
                    f"batch {batch}", "value": share, "goal": "< 0.05", "ok": share < 0.05})
    return out


def table(result: dict) -> str:
    """A readable table of the rows, the correctness check, the conv share and the targets."""
    s = result["setup"]
    lines = [f"{s['arch']} {s['size']}x{s['size']}, {s['threads']} threads, guided conv_max; "
             f"weights {result['weights_mib']:.0f} MiB", *row_lines(result["rows"]), ""]
    for c in result["conv_share"]:
        lines.append(f"scores {c['method']:13} batch {c['batch']}: {c['wall_s']:.3f} s, "
                     f"convolutions {c['conv_s']:.3f} s, outside {100 * c['outside_share']:.1f}%")
    lines += [*error_lines(result["errors_vs_float64"]), ""]
    if not result["targets"]:
        lines.append("quick run: the targets apply to the full benchmark")
    for t in result["targets"]:
        lines.append(f"{'ok' if t['ok'] else 'MISSED':6} {t['target']}: {t['value']:.3f} "
                     f"(goal {t['goal']})")
    lines.append("\n" + machine.summary(result["machine"]))
    return "\n".join(lines)


def row_lines(rows: list[dict]) -> list[str]:
    """A header and one line per row: time, speed and peak memory, each beside Captum's."""
    lines = [f"{'method':17} {'batch':>5} {'ms/batch':>9} {'img/s':>9} {'x Captum':>9} "
             f"{'peak MiB':>9} {'x Captum':>9}"]
    for r in rows:
        lines.append(f"{r['method']:17} {r['batch']:>5} {1e3 * r['seconds']:9.1f} "
                     f"{r['images_per_s']:9.2f} {r['speed_vs_captum']:9.2f} "
                     f"{r['peak_mib']:9.0f} {r['memory_vs_captum']:9.2f}")
    return lines


def error_lines(errors: list[dict]) -> list[str]:
    """One line per batch: each method's max and L2 relative error against float64 Captum."""
    return [f"error vs float64 Captum, batch {e['batch']} (max rel / L2 rel): " + ", ".join(
        f"{m} {e[m]['max_rel']:.1e} / {e[m]['l2_rel']:.1e}" for m in METHODS) for e in errors]
