"""`frmap bench entropy`: local entropy, scikit-image vs the C++ kernel (1 and 2 threads) vs Triton,
and the whole response score (reference vs C++).

Every time is the best of a few repeats, and every speed is quoted as a ratio against
scikit-image (the reference backend for the score) measured in the same run (absolute times
depend on the machine). `bench_entropy.py` hands the same cases, checks and calls to
pytest-benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import ball, disk

import frmap.bench.machine as machine
from frmap.kernels import local_entropy, resolve_backend, response_score, set_num_threads


@dataclass(frozen=True)
class Row:
    case: str
    image: str
    shape: tuple[int, ...]
    footprint: str
    backend: str
    threads: int
    seconds: float
    vs_skimage: float
    mpix_per_s: float


def bench_image(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """'random': uniform uint8 noise; 'smooth': Gaussian-filtered noise (few levels per window)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), (0,) * (len(shape) - 2) + (3.0, 3.0))
    lo = x.min(axis=(-2, -1), keepdims=True)
    hi = x.max(axis=(-2, -1), keepdims=True)
    return ((x - lo) / (hi - lo) * 255).astype(np.uint8)


def best_time(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    fn()  # warm-up (and Triton compilation)
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def skimage_stack(images: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """The reference: scikit-image's rank entropy, image by image."""
    spatial = images.shape[-fp.ndim:]
    return np.stack([skimage_entropy(x, fp) for x in images.reshape(-1, *spatial)])


def footprint(name: str) -> np.ndarray:
    """'disk(3)' -> disk(3); 'ball(2)' -> ball(2) (a 3-D footprint: the image is a volume)."""
    shape, radius = name.rstrip(")").split("(")
    return {"disk": disk, "ball": ball}[shape](int(radius))


def cases(quick: bool) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(case, image kind, shape, footprint)."""
    if quick:
        return [("224", kind, (224, 224), "disk(3)") for kind in ("random", "smooth")] + [
            ("batch", "random", (8, 224, 224), "disk(3)"),
            ("volume", "random", (16, 64, 64), "ball(2)"),
        ]
    cases = [("224", kind, (224, 224), f"disk({r})") for kind in ("random", "smooth")
             for r in (2, 3, 5, 7)]
    cases += [("1024", "random", (1024, 1024), f"disk({r})") for r in (2, 3, 5, 7)]
    cases += [("batch64", "random", (64, 224, 224), "disk(3)")]
    cases += [("volume", "random", (64, 128, 128), f"ball({r})") for r in (2, 3)]
    return cases


def check(image: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """The reference's entropy of `image`, once asserted equal to the C++ kernel's."""
    expected = skimage_stack(image, fp).reshape(image.shape)
    np.testing.assert_allclose(local_entropy(image, fp, backend="cpu"), expected, atol=1e-9)
    return expected


SCORE_BACKENDS = ("reference", "cpu")


def score_responses(seed: int = 0) -> np.ndarray:
    """A batch of 8 RGB 224x224 response maps, 30% of them non-zero (float32)."""
    rng = np.random.default_rng(seed)
    responses = (rng.standard_normal((8, 3, 224, 224)) * (rng.random((8, 3, 224, 224)) < 0.3))
    return responses.astype(np.float32)


def score_call(responses: np.ndarray, backend: str) -> Callable[[], np.ndarray]:
    """The whole response score of `responses` (square(3)) on `backend`."""
    return lambda: response_score(responses, np.ones((3, 3)), backend=backend)


def _two_halves(images: np.ndarray, fp: np.ndarray) -> None:
    """Two single-thread calls on the two halves of a batch, in two threads at once: what the
    machine allows two threads to gain, with no shared work at all."""
    half = len(images) // 2
    set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda part: local_entropy(part, fp, backend="cpu"),
                          (images[:half], images[half:])))
    finally:
        set_num_threads(None)


def _time_case(case: str, kind: str, shape: tuple[int, ...], fp_name: str, quick: bool
               ) -> list[Row]:
    image, fp = bench_image(kind, shape), footprint(fp_name)
    big = image.size > 300_000
    expected = check(image, fp)
    t_ref = best_time(lambda: skimage_stack(image, fp), 1 if (quick or big) else 3)
    times = [("skimage", 1, t_ref)]
    for threads in (1, 2):
        set_num_threads(threads)
        t = best_time(lambda: local_entropy(image, fp, backend="cpu"), 5 if big else 20)
        times.append(("cpu", threads, t))
    set_num_threads(None)
    if image.ndim == fp.ndim + 1:
        times.append(("cpu-2x1", 2, best_time(lambda: _two_halves(image, fp), 5)))
    if torch.cuda.is_available() and fp.ndim == 2:
        x = torch.from_numpy(image).cuda()
        got = local_entropy(x, fp, backend="triton").cpu().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-9)
        t = best_time(lambda: local_entropy(x, fp, backend="triton"), 20, sync=True)
        times.append(("triton", 0, t))
    return [
        Row(case, kind, shape, fp_name, backend, threads, t, t_ref / t,
            image.size / t / 1e6)
        for backend, threads, t in times
    ]


def run(quick: bool = False) -> dict:
    """Time every case; return the rows, the targets and the machine."""
    resolve_backend("cpu", np.zeros((1, 1), np.uint8))  # raises where the C++ kernel is not built
    rows = [r for c in cases(quick) for r in _time_case(*c, quick=quick)]
    return {"rows": [asdict(r) for r in rows], "targets": _targets(rows),
            "score": _time_score(quick), "machine": machine.describe()}


def _time_score(quick: bool) -> list[dict]:
    """The response score on each backend, as a ratio against the reference backend."""
    responses = score_responses()
    seconds = {b: best_time(score_call(responses, b), 3 if quick else 10) for b in SCORE_BACKENDS}
    return [{"case": "response_score 8x3x224x224 square(3)", "backend": b, "seconds": t,
             "vs_reference": seconds["reference"] / t} for b, t in seconds.items()]


def _find(rows: list[Row], **key: object) -> Row | None:
    return next((r for r in rows if all(getattr(r, k) == v for k, v in key.items())), None)


def _targets(rows: list[Row]) -> list[dict]:
    out = []
    for kind, goal in (("random", 50.0), ("smooth", 30.0)):
        r = _find(rows, case="224", image=kind, footprint="disk(3)", backend="cpu", threads=1)
        if r:
            out.append({"target": f"cpu 1 thread vs skimage, 224x224 {kind}, disk(3)",
                        "value": r.vs_skimage, "goal": goal, "ok": r.vs_skimage >= goal})
    small = _find(rows, case="224", image="random", footprint="disk(2)", backend="cpu", threads=1)
    large = _find(rows, case="224", image="random", footprint="disk(7)", backend="cpu", threads=1)
    if small and large:
        growth = large.seconds / small.seconds
        area = float(disk(7).sum() / disk(2).sum())
        out.append({"target": "cpu time disk(7)/disk(2) grows like the radius (3.5x), not the "
                    f"area ({area:.1f}x)", "value": growth, "goal": area / 2,
                    "ok": bool(growth < area / 2)})
    for case in ("batch64", "batch"):
        one = _find(rows, case=case, backend="cpu", threads=1)
        two = _find(rows, case=case, backend="cpu", threads=2)
        ceiling = _find(rows, case=case, backend="cpu-2x1")
        if one and two:
            speedup = one.seconds / two.seconds
            out.append({"target": f"cpu 2 threads vs 1 thread on the {case} of 224x224 images",
                        "value": speedup, "goal": 1.8, "ok": bool(speedup >= 1.8)})
        if one and ceiling:
            out.append({"target": "this machine's ceiling: two independent 1-thread calls on "
                        "the two halves, at once, vs one call", "value": one.seconds /
                        ceiling.seconds, "goal": 1.8, "ok": bool(one.seconds / ceiling.seconds
                                                                 >= 1.8)})
    return out


def table(result: dict) -> str:
    """A readable table of the rows and targets."""
    lines = [f"{'case':8} {'image':7} {'footprint':9} {'backend':8} {'thr':>3} "
             f"{'ms':>10} {'x skimage':>10} {'Mpix/s':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['case']:8} {r['image']:7} {r['footprint']:9} {r['backend']:8} "
                     f"{r['threads']:>3} {r['seconds'] * 1e3:10.3f} {r['vs_skimage']:10.1f} "
                     f"{r['mpix_per_s']:8.1f}")
    for r in result.get("score", []):
        lines.append(f"{r['case']} {r['backend']:9} {r['seconds'] * 1e3:10.3f} ms "
                     f"{r['vs_reference']:6.1f}x the reference")
    lines.append("")
    for t in result["targets"]:
        mark = "ok" if t["ok"] else "MISSED"
        lines.append(f"{mark:6} {t['target']}: {t['value']:.2f} (goal {t['goal']:.2f})")
    lines.append("\n" + machine.summary(result["machine"]))
    return "\n".join(lines)
