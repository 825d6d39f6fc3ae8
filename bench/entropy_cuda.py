"""`frmap bench entropy --device cuda`: the Triton local entropy against cuCIM and scikit-image.

For square(3), disk(2), disk(3), disk(5) and disk(7) on 64 x 224 x 224 and 1024 x 1024 uniform
uint8 noise: the Triton kernel's pixels per second, cuCIM's `rank.entropy` on the same images
(one call per image, as its API takes them) and the ratio, measured in the same run with
`triton.testing.do_bench` (warm-up rounds compile the kernels; CUDA events time the rest), and
beside each figure the operation-count estimate of the kernel that ran
(`frmap.kernels.triton.entropy.operation_count`), so a first GPU run shows at once how far each
kernel is from its count. Correctness is asserted once per row before timing: Triton against
scikit-image on the first image, cuCIM against scikit-image on interior pixels only (its
borders reflect, scikit-image's shrink).

The anchor rows repeat the published cuCIM measurement (cuCIM PR 1115, 2026: `rank.entropy`
on one 1920 x 1080 uint8 image against scikit-image, square windows of 3 to 75 pixels a side):
frmap (a torch tensor, and the same data as a CuPy array through DLPack), cuCIM where it is
installed, and scikit-image on the CPU, each speed quoted against scikit-image measured in the
same run, beside the published cuCIM ratio. frmap's values must equal scikit-image's
everywhere (atol 1e-9); cuCIM's only inside the border.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.bench.machine as machine
from frmap.kernels import local_entropy

FOOTPRINTS = {
    "square(3)": np.ones((3, 3), np.uint8),
    "disk(2)": disk(2),
    "disk(3)": disk(3),
    "disk(5)": disk(5),
    "disk(7)": disk(7),
}
SHAPES = [(64, 224, 224), (1, 1024, 1024)]
QUICK = (["square(3)", "disk(5)"], [(8, 224, 224)])

# cuCIM PR 1115 (2026): rank.entropy speedup over scikit-image, 1920 x 1080 uint8, by the side
# of the square window
ANCHOR_SHAPE = (1080, 1920)
ANCHOR = {3: 247.0, 7: 108.0, 15: 48.0, 25: 21.0, 51: 25.0, 75: 28.0}
QUICK_ANCHOR = (3, 15)


@dataclass(frozen=True)
class CudaRow:
    """One measured problem; rates in pixels per second, estimates per output pixel."""

    shape: tuple[int, int, int]
    footprint: str
    variant: str
    est_register_ops: float
    est_memory_ops: float
    triton_pix_per_s: float
    cucim_pix_per_s: float | None
    vs_cucim: float | None


@dataclass(frozen=True)
class AnchorRow:
    """One window of the published table; times in milliseconds, speedups over scikit-image.

    Attributes:
        window: side of the square footprint.
        skimage_ms: scikit-image on the CPU (one call).
        frmap_ms: frmap on a torch CUDA tensor (the Triton kernels).
        frmap_cupy_ms: frmap on the same image as a CuPy array (DLPack in and out), or None.
        cucim_ms: cuCIM's rank.entropy, or None where it is not installed.
        frmap_vs_skimage, cucim_vs_skimage: speedups measured here.
        published_cucim_vs_skimage: the speedup cuCIM published for this window.
    """

    window: int
    variant: str
    skimage_ms: float
    frmap_ms: float
    frmap_cupy_ms: float | None
    cucim_ms: float | None
    frmap_vs_skimage: float
    cucim_vs_skimage: float | None
    published_cucim_vs_skimage: float


def unavailable_reason() -> str | None:
    """Why the CUDA rows cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def _cucim_entropy():
    """cuCIM's rank.entropy and cupy, or (None, reason)."""
    try:
        cupy = importlib.import_module("cupy")
        rank = importlib.import_module("cucim.skimage.filters.rank")
        return (cupy, rank.entropy), None
    except (ImportError, AttributeError) as err:
        return None, ("cuCIM comparison skipped: cucim.skimage.filters.rank.entropy is "
                      f"unavailable ({err})")


def _cupy():
    """cupy, or (None, reason)."""
    try:
        return importlib.import_module("cupy"), None
    except ImportError as err:
        return None, f"CuPy rows skipped: cupy is not installed ({err})"


def _interior(x: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    fh, fw = footprint.shape
    return x[..., fh:-fh, fw:-fw]


def _anchor_rows(cupy, cucim_entropy, quick: bool) -> list[dict]:
    """The published table's windows on one 1920 x 1080 uint8 noise image (CuPy rows where
    `cupy` is given, cuCIM rows where `cucim_entropy` is)."""
    from triton.testing import do_bench

    from frmap.kernels.triton.entropy import variant_for

    image = np.random.default_rng(1).integers(0, 256, ANCHOR_SHAPE, dtype=np.uint8)
    x = torch.from_numpy(image).cuda()
    x_cupy = None if cupy is None else cupy.asarray(image)
    rows = []
    for side in QUICK_ANCHOR if quick else ANCHOR:
        fp = np.ones((side, side), np.uint8)
        start = time.perf_counter()
        expected = skimage_entropy(image, fp)
        skimage_ms = (time.perf_counter() - start) * 1e3
        got = local_entropy(x, fp, backend="triton").cpu().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        frmap_ms = do_bench(lambda fp=fp: local_entropy(x, fp, backend="triton"))
        cupy_ms = cucim_ms = None
        if cupy is not None:
            ours = local_entropy(x_cupy, fp, backend="triton")
            assert isinstance(ours, cupy.ndarray) and ours.device == x_cupy.device
            np.testing.assert_array_equal(cupy.asnumpy(ours), got)
            cupy_ms = do_bench(lambda fp=fp: local_entropy(x_cupy, fp, backend="triton"))
        if cucim_entropy is not None:
            cu_fp = cupy.asarray(fp)
            theirs = cupy.asnumpy(cucim_entropy(x_cupy, cu_fp))
            np.testing.assert_allclose(_interior(theirs, fp), _interior(expected, fp), rtol=0,
                                       atol=1e-5)
            cucim_ms = do_bench(lambda cu_fp=cu_fp: cucim_entropy(x_cupy, cu_fp))
        rows.append(asdict(AnchorRow(
            side, variant_for(side * side), skimage_ms, frmap_ms, cupy_ms, cucim_ms,
            skimage_ms / frmap_ms, None if cucim_ms is None else skimage_ms / cucim_ms,
            ANCHOR[side])))
    return rows


def run(quick: bool = False) -> dict:
    """Measure every row, or say why the rows are skipped here.

    Returns:
        {"rows": [CudaRow as dict], "anchor": [AnchorRow as dict], "notes": [what was skipped
        and why], "skipped": reason or None, "machine": `frmap.bench.machine.describe()`}.
    """
    result = {"rows": [], "anchor": [], "notes": [], "skipped": unavailable_reason(),
              "machine": machine.describe()}
    if result["skipped"]:
        return result
    from triton.testing import do_bench

    from frmap.kernels.triton.entropy import operation_count

    cucim, note = _cucim_entropy()
    cupy, cupy_note = _cupy()
    result["notes"] += [n for n in (note, cupy_note) if n is not None]
    names, shapes = QUICK if quick else (list(FOOTPRINTS), SHAPES)
    rng = np.random.default_rng(0)
    for shape in shapes:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        x = torch.from_numpy(images).cuda()
        for name in names:
            fp = FOOTPRINTS[name]
            expected = skimage_entropy(images[0], fp)
            got = local_entropy(x, fp, backend="triton")[0].cpu().numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
            ms = do_bench(lambda x=x, fp=fp: local_entropy(x, fp, backend="triton"))
            rate = images.size / (ms / 1e3)
            cucim_rate = None
            if cucim is not None:
                cupy, entropy = cucim
                planes = [cupy.asarray(p) for p in images]
                cu_fp = cupy.asarray(fp)
                theirs = cupy.asnumpy(entropy(planes[0], cu_fp))
                np.testing.assert_allclose(_interior(theirs, fp), _interior(expected, fp),
                                           rtol=0, atol=1e-5)
                cu_ms = do_bench(lambda planes=planes, cu_fp=cu_fp, entropy=entropy:
                                 [entropy(p, cu_fp) for p in planes])
                cucim_rate = images.size / (cu_ms / 1e3)
            est = operation_count(fp, shape)
            row = CudaRow(shape, name, est.variant, est.register_ops, est.memory_ops, rate,
                          cucim_rate, None if cucim_rate is None else rate / cucim_rate)
            result["rows"].append(asdict(row))
    result["anchor"] = _anchor_rows(cupy, None if cucim is None else cucim[1], quick)
    return result


def table(result: dict) -> str:
    """The rows as a table, the notes, and the machine; or why the rows were skipped."""
    if result["skipped"]:
        return f"CUDA rows skipped: {result['skipped']}"
    lines = [f"{'shape':>15} {'footprint':>9} {'kernel':>8} {'Gpix/s':>8} {'cuCIM':>8} "
             f"{'ratio':>7}  est. ops/pixel (register + memory)"]
    for r in result["rows"]:
        cu = "-" if r["cucim_pix_per_s"] is None else f"{r['cucim_pix_per_s'] / 1e9:8.3f}"
        ratio = "-" if r["vs_cucim"] is None else f"{r['vs_cucim']:6.1f}x"
        lines.append(f"{'x'.join(map(str, r['shape'])):>15} {r['footprint']:>9} "
                     f"{r['variant']:>8} {r['triton_pix_per_s'] / 1e9:8.3f} {cu:>8} {ratio:>7}  "
                     f"{r['est_register_ops']:,.0f} + {r['est_memory_ops']:,.0f}")
    lines += ["", "1920x1080 uint8, square windows (cuCIM PR 1115's table): ms, and speedup over "
              "scikit-image on this machine's CPU"]
    lines.append(f"{'window':>7} {'kernel':>8} {'skimage':>9} {'frmap':>8} {'CuPy in':>8} "
                 f"{'cuCIM':>8} {'frmap x':>8} {'cuCIM x':>8} {'published':>9}")
    for r in result["anchor"]:
        cells = [f"{r[k]:8.3f}" if r[k] is not None else f"{'-':>8}"
                 for k in ("frmap_ms", "frmap_cupy_ms", "cucim_ms")]
        cucim_x = "-" if r["cucim_vs_skimage"] is None else f"{r['cucim_vs_skimage']:7.1f}x"
        lines.append(f"{r['window']:>7} {r['variant']:>8} {r['skimage_ms']:9.1f} "
                     f"{' '.join(cells)} {r['frmap_vs_skimage']:7.1f}x {cucim_x:>8} "
                     f"{r['published_cucim_vs_skimage']:8.0f}x")
    lines += result["notes"] + ["", machine.summary(result["machine"])]
    return "\n".join(lines)
