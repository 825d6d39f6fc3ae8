"""`frmap bench entropy --device cuda`: the Triton local entropy against cuCIM.

For square(3), disk(2), disk(3), disk(5) and disk(7) on 64 x 224 x 224 and 1024 x 1024 uniform
uint8 noise: the Triton kernel's pixels per second, cuCIM's `rank.entropy` on the same images
(one call per image, as its API takes them) and the ratio, measured in the same run with
`triton.testing.do_bench` (warm-up rounds compile the kernels; CUDA events time the rest), and
beside each figure the operation-count estimate of the kernel that ran
(`frmap.kernels.triton.entropy.operation_count`), so a first GPU run shows at once how far each
kernel is from its count. Correctness is asserted once per row before timing: Triton against
scikit-image on the first image, cuCIM against scikit-image on interior pixels only (its
borders reflect, scikit-image's shrink).
"""

from __future__ import annotations

import importlib
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


def _interior(x: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    fh, fw = footprint.shape
    return x[..., fh:-fh, fw:-fw]


def run(quick: bool = False) -> dict:
    """Measure every row, or say why the rows are skipped here.

    Returns:
        {"rows": [CudaRow as dict], "notes": [what was skipped and why], "skipped": reason or
        None, "machine": `frmap.bench.machine.describe()`}.
    """
    result = {"rows": [], "notes": [], "skipped": unavailable_reason(),
              "machine": machine.describe()}
    if result["skipped"]:
        return result
    from triton.testing import do_bench

    from frmap.kernels.triton.entropy import operation_count

    cucim, note = _cucim_entropy()
    result["notes"] += [] if note is None else [note]
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
    lines += result["notes"] + ["", machine.summary(result["machine"])]
    return "\n".join(lines)
