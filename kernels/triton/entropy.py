"""Triton local entropy of [N, H, W] integer images: two kernels chosen by the footprint's size.

Math. A window of n pixels whose levels have counts c_b has
    S = -sum_b (c_b / n) log2(c_b / n) = (T[n] - sum_b T[c_b]) / n,   T[c] = c log2 c,
with T in 64-bit fixed point: T[c] = c L[c], L[c] ~ log2 c * 2^s built additively from c's
prime factors (L[2] = 2^s exactly, each odd prime's log rounded once; s as large as T[K+1] <
2^61 allows: 55 fraction bits for square(3), 50 for disk(7)). The numerator T[n] - sum_b
T[c_b] is an exact integer, turned into a float64 and divided by n * 2^s with one rounding
each. Where the entropy is rational, m / n (2^k equally frequent values: k bits, whatever n),
the odd primes' parts cancel exactly, the numerator is m 2^s exactly, and the division returns
m / n correctly rounded: exactly k bits, exactly 0 for a window of one value. Elsewhere the
error is a few 2^-s plus two roundings (~1e-16 relative). Pixels outside the image or masked
out are left out of the window (it shrinks); an empty window gives 0.

Two kernels (K = pixels the footprint selects, R = its runs of set pixels, about its height):

* `_pairwise_kernel`, K <= PAIRWISE_MAX_K. One output pixel per lane; the K window levels are
  K separate [BLOCK] vectors (the footprint's offsets are compile-time constants, unrolled with
  tl.static_range). With the forward count f_q = #{p > q : v_p = v_q}, a level held c times
  has forward counts c-1, ..., 1, 0 at its occurrences, so sum_b T[c_b] = sum_q D[f_q] with
  D[f] = T[f+1] - T[f] (telescoping): each pair (q, p) is compared once and nothing crosses
  lanes. A missing pixel q carries the level -1 - q, which equals no other, so D[0] = 0 drops
  it. Per pixel: K loads, K(K-1)/2 compares and as many adds, K gathers of D (a table of K+1
  int64 in L1), K int64 adds.
* `_sliding_kernel`, larger K. One row segment of up to SEG output pixels per lane, walked
  left to right with a histogram per lane (in a global scratch buffer, bin-major so that lanes
  reading the same bin coalesce; L1/L2 resident). A step right changes only each run's two
  ends: one pixel enters, one leaves, and each moves sum_b T[c_b] by one D value, so the
  running sum stays an exact integer. Per pixel: 2R x (a pixel load, a histogram load and
  store, a D gather, an int64 add), plus K updates per segment to fill the first window
  (K / SEG per pixel).

Operation counts per output pixel (`operation_count`; register operations + memory operations).
Old kernel: a [BLOCK, KP] tile, K x KP compares, as many adds and K row reductions (KP = K
rounded up to a power of two). New: `operation_count` for 64 x 224 x 224 uint8 images.

    footprint   K   R   old: compares + adds        new kernel   register + memory ops
    square(3)   9   3          144 + 144            pairwise       144 + 18
    disk(2)    13   5          208 + 208            pairwise       260 + 26
    disk(3)    29   7          928 + 928            pairwise     1,044 + 58
    disk(5)    81  11       10,368 + 10,368         sliding        238 + 95
    disk(7)   149  15       38,144 + 38,144         sliding        333 + 133

Crossover. Three of a sliding update's four memory operations are scattered (bin load and store,
D gather), each worth roughly 20-30 register operations of L1 throughput on an H100/H200 (4
sectors per clock per SM against 64-128 integer lanes per clock), so an update costs ~80-100
register-operation equivalents and a pixel ~2R of them: disk(3) ~1,300 sliding against ~1,100
pairwise. The pairwise cost grows with the area squared, the sliding one with the height: they
cross near K = 30, hence PAIRWISE_MAX_K = 32. The first GPU run (`frmap bench entropy --device
cuda`, which prints these estimates beside the measured rates) checks it.

Levels: uint8 images are read as they are; uint16 as int32. The sliding kernel's histogram has
max + 1 bins (256 for uint8; one device-to-host read of the maximum for uint16), its scratch is
capped per launch (waves of lanes), and its counts are uint8, int16 or int32 by K.

Launches go through `torch.library.wrap_triton`, so that torch.compile sees these kernels
inside the registered operators (`frmap.kernels.torch_ops`); while it traces, the host tables
become constants of the graph and uint16 images get 65536 bins (their maximum is data). No
float product feeds a sum here, so contraction into FMAs cannot change a value.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ._launch import block_size, grid

PAIRWISE_MAX_K = 32
VARIANTS = ("pairwise", "sliding")

_PAIRWISE_GPU_BLOCK = 128  # one pixel per thread: disk(3) holds ~135 registers (ptxas, sm_90)
_SLIDING_WARPS = 4
_SLIDING_BLOCK = 32 * _SLIDING_WARPS  # one lane per thread: no thread duplicates a lane's stores
_SLIDING_LANES = 1 << 16  # lanes in flight: enough to hide the histogram's memory latency
_MIN_SEGMENT = 32  # output pixels per lane at least: the first window's K updates amortise
_SCRATCH_BYTES = 64 << 20  # histogram scratch per launch (uint16 images may need waves)


def variant_for(k: int) -> str:
    """The kernel for a footprint of `k` pixels: "pairwise" up to PAIRWISE_MAX_K, else
    "sliding" (see the module docstring for the operation counts behind the crossover)."""
    return "pairwise" if k <= PAIRWISE_MAX_K else "sliding"


@dataclass(frozen=True)
class OperationCount:
    """Estimated work per output pixel, counted from the kernel's code (not measured).

    Attributes:
        variant: "pairwise" or "sliding".
        register_ops: compares, integer adds and selects.
        memory_ops: loads and stores (image levels, histogram bins, table gathers).
    """

    variant: str
    register_ops: float
    memory_ops: float


def operation_count(footprint: np.ndarray, shape: tuple[int, int, int]) -> OperationCount:
    """The estimate for `footprint` ([h, w] binary) on [N, H, W] images (no mask).

    pairwise: K(K-1) (a compare and an add per pair) + 8K (offsets, bounds, select, sum)
    register operations, 2K memory operations (K levels, K D gathers). sliding: u = 2R + K/SEG
    histogram updates (R runs, SEG pixels per lane), each ~10 register and 4 memory operations
    (a level load, a bin load and store, a D gather).
    """
    k = int(np.count_nonzero(footprint))
    variant = variant_for(k)
    if variant == "pairwise":
        return OperationCount(variant, k * (k - 1) + 8 * k, 2 * k)
    seg, _ = _segments(*shape)
    updates = 2 * len(_runs(np.asarray(footprint, np.uint8))) + k / seg
    return OperationCount(variant, 10 * updates, 4 * updates)


@triton.jit
def _bits(n, s, t_ptr, SCALE: tl.constexpr):
    """(T[n] - s) / (n * SCALE): the entropy of a window of n pixels whose counts have the
    fixed-point sum s = sum_b T[c_b]; 0 for an empty window."""
    num = tl.load(t_ptr + n) - s
    return num.to(tl.float64) / (tl.maximum(n, 1).to(tl.float64) * SCALE)


@triton.jit
def _pairwise_kernel(img_ptr, mask_ptr, t_ptr, d_ptr, out_ptr, H, W, n_blocks,
                     DY: tl.constexpr, DX: tl.constexpr, K: tl.constexpr, SCALE: tl.constexpr,
                     MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Entropy of BLOCK output pixels of one image into out, or (MEAN) their sum into
    out[program]; the window's offsets (DY[q], DX[q]) are compile-time constants."""
    pid = tl.program_id(0)
    image = (pid // n_blocks).to(tl.int64)
    pix = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < H * W
    r = pix // W
    c = pix % W
    base = image * H * W
    n = tl.zeros([BLOCK], dtype=tl.int32)
    levels = ()
    for q in tl.static_range(K):
        y = r + DY[q]
        x = c + DX[q]
        ok = inside & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        at = base + y * W + x
        if mask_ptr is not None:
            ok = ok & (tl.load(mask_ptr + at, mask=ok, other=0) != 0)
        n += ok.to(tl.int32)
        levels = levels + (tl.where(ok, tl.load(img_ptr + at, mask=ok, other=0).to(tl.int32),
                                    -1 - q),)
    # s = sum_q D[f_q], f_q = #{p > q : v_p == v_q}
    s = tl.zeros([BLOCK], dtype=tl.int64)
    for q in tl.static_range(K):
        f = tl.zeros([BLOCK], dtype=tl.int32)
        for p in tl.static_range(q + 1, K):
            f += (levels[q] == levels[p]).to(tl.int32)
        s += tl.load(d_ptr + f)
    bits = _bits(n, s, t_ptr, SCALE)
    if MEAN:
        tl.store(out_ptr + pid, tl.sum(tl.where(inside, bits, 0.0), axis=0))
    else:
        tl.store(out_ptr + base + pix, bits, mask=inside)


@triton.jit
def _update(img_ptr, mask_ptr, hist_ptr, d_ptr, base, y, x, ok, H, W, slot, LANES, s, n,
            ADD: tl.constexpr):
    """Add (ADD) or remove the pixel (y, x) of each lane's window: its histogram count c moves
    by one and s by D[c] (adding) or -D[c - 1] (removing). Returns the new (s, n)."""
    ok = ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    at = base + y * W + x
    if mask_ptr is not None:
        ok = ok & (tl.load(mask_ptr + at, mask=ok, other=0) != 0)
    level = tl.load(img_ptr + at, mask=ok, other=0).to(tl.int64)
    bin_ptr = hist_ptr + level * LANES + slot
    count = tl.load(bin_ptr, mask=ok, other=0).to(tl.int32)
    if ADD:
        s += tl.load(d_ptr + count, mask=ok, other=0)
        tl.store(bin_ptr, (count + 1).to(hist_ptr.dtype.element_ty), mask=ok)
        n += ok.to(tl.int32)
    else:
        s -= tl.load(d_ptr + count - 1, mask=ok, other=0)
        tl.store(bin_ptr, (count - 1).to(hist_ptr.dtype.element_ty), mask=ok)
        n -= ok.to(tl.int32)
    return s, n


@triton.jit
def _sliding_kernel(img_ptr, mask_ptr, hist_ptr, offs_ptr, runs_ptr, t_ptr, d_ptr, out_ptr,
                    H, W, K, R, SEG, n_seg, lane0, LANES, total_lanes,
                    SCALE: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Entropy along row segments: lane `lane0 + i` walks segment (image, row, seg) with its
    own histogram (bins of `hist_ptr`, stride LANES); out gets the map, or (MEAN) each lane's
    sum. offs: [K, 2] (dy, dx) of the window; runs: [R, 3] (dy, dx entering, dx leaving) of a
    step right, relative to the new centre."""
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lane = lane0 + slot
    live = (slot < LANES) & (lane < total_lanes)
    row = (lane // n_seg) % H
    image = (lane // (n_seg * H)).to(tl.int64)
    base = image * H * W
    c0 = (lane % n_seg) * SEG
    c1 = tl.minimum(c0 + SEG, W)
    s = tl.zeros([BLOCK], dtype=tl.int64)
    n = tl.zeros([BLOCK], dtype=tl.int32)
    for q in range(K):
        s, n = _update(img_ptr, mask_ptr, hist_ptr, d_ptr, base, row + tl.load(offs_ptr + 2 * q),
                       c0 + tl.load(offs_ptr + 2 * q + 1), live, H, W, slot, LANES, s, n, True)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(SEG):
        col = c0 + j
        here = live & (col < c1)
        bits = _bits(n, s, t_ptr, SCALE)
        if MEAN:
            acc += tl.where(here, bits, 0.0)
        else:
            tl.store(out_ptr + base + row * W + col, bits, mask=here)
        step = here & (col + 1 < c1)
        for k in range(R):
            y = row + tl.load(runs_ptr + 3 * k)
            s, n = _update(img_ptr, mask_ptr, hist_ptr, d_ptr, base, y,
                           col + 1 + tl.load(runs_ptr + 3 * k + 1), step, H, W, slot, LANES,
                           s, n, True)
            s, n = _update(img_ptr, mask_ptr, hist_ptr, d_ptr, base, y,
                           col + 1 + tl.load(runs_ptr + 3 * k + 2), step, H, W, slot, LANES,
                           s, n, False)
    if MEAN:
        tl.store(out_ptr + lane, acc, mask=live)


def _fixed_log2(p: int, shift: int) -> int:
    """round(log2 p * 2^shift) for a prime p, from 40 significant digits; 2 gives 2^shift."""
    if p == 2:
        return 1 << shift
    with decimal.localcontext(decimal.Context(prec=40)):
        x = decimal.Decimal(p).ln() / decimal.Decimal(2).ln() * (1 << shift)
        return int(x.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


@lru_cache(maxsize=64)
def _tables(k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(T, D, 2^s) for windows of up to k pixels, built once per k: T[c] = c L[c] for
    c <= k + 1 and D[c] = T[c + 1] - T[c] (int64), where L[c] ~ log2 c * 2^s is built
    additively from c's prime factors (L[2] = 2^s exactly, each odd prime rounded once)."""
    shift = 61 - math.ceil(math.log2((k + 2) * math.log2(k + 2)))  # T[k + 1] < 2^61
    smallest = list(range(k + 2))  # smallest prime factor of each c
    for p in range(2, math.isqrt(k + 1) + 1):
        if smallest[p] == p:
            for m in range(p * p, k + 2, p):
                smallest[m] = min(smallest[m], p)
    logs = [0] * (k + 2)  # L[c], exact integers
    for c in range(2, k + 2):
        p = smallest[c]
        logs[c] = logs[c // p] + _fixed_log2(p, shift)
    t = np.array([c * logs[c] for c in range(k + 2)], dtype=np.int64)
    return t, np.diff(t), 2.0**shift


@lru_cache(maxsize=128)
def _cached_on_device(table: bytes, dtype: str, shape: tuple[int, ...],
                      device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(table, dtype=dtype).reshape(shape).copy()).to(device)


def _on_device(table: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A host table on `like`'s device: cached for real tensors; made afresh while torch.compile
    or torch.export traces (fake tensors), where it becomes a constant of the graph."""
    if is_fake(like):
        return torch.from_numpy(table).to(like.device)
    return _cached_on_device(table.tobytes(), table.dtype.str, table.shape, like.device)


def _offsets(footprint: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dy, dx) of the footprint's set pixels relative to its centre (h // 2, w // 2)."""
    ys, xs = np.nonzero(footprint)
    fh, fw = footprint.shape
    return tuple(int(y) for y in ys - fh // 2), tuple(int(x) for x in xs - fw // 2)


@lru_cache(maxsize=64)
def _walk_tables(fp_bytes: bytes, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Host tables of the sliding kernel, built once per footprint: [K, 2] window offsets and
    [R, 3] (dy, dx entering, dx leaving) per run of set pixels in a footprint row, int32."""
    footprint = np.frombuffer(fp_bytes, dtype=np.uint8).reshape(shape)
    offs = np.array(list(zip(*_offsets(footprint), strict=True)), dtype=np.int32)
    return offs, np.array(_runs(footprint), dtype=np.int32).reshape(-1, 3)


def _runs(footprint: np.ndarray) -> list[tuple[int, int, int]]:
    """(dy, dx entering, dx leaving) of a step right, per run of set pixels in a row."""
    cy, cx = footprint.shape[0] // 2, footprint.shape[1] // 2
    runs = []
    for i, row in enumerate(footprint):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs += [(i - cy, int(stop) - 1 - cx, int(start) - 1 - cx)
                 for start, stop in zip(starts, stops, strict=True)]
    return runs


def _segments(n: int, h: int, w: int) -> tuple[int, int]:
    """(SEG, segments per row) of the sliding kernel: rows split until about _SLIDING_LANES
    lanes are in flight, but never below _MIN_SEGMENT pixels per lane."""
    segments = min(triton.cdiv(w, _MIN_SEGMENT), max(1, triton.cdiv(_SLIDING_LANES, n * h)))
    seg = triton.cdiv(w, segments)
    return seg, triton.cdiv(w, seg)


def _count_dtype(k: int) -> torch.dtype:
    """The narrowest histogram count type that holds k."""
    return torch.uint8 if k <= 255 else torch.int16 if k <= 32767 else torch.int32


def _pairwise(images: torch.Tensor, mask: torch.Tensor | None, footprint: np.ndarray,
              out_dtype: torch.dtype | None) -> torch.Tensor:
    n, h, w = images.shape
    dy, dx = _offsets(footprint)
    t, d, scale = _tables(len(dy))
    t, d = _on_device(t, images), _on_device(d, images)
    block, n_blocks = grid(h * w, images.device, _PAIRWISE_GPU_BLOCK)
    mean = out_dtype is None
    shape = (n, n_blocks) if mean else (n, h, w)
    out = torch.empty(shape, dtype=torch.float64 if mean else out_dtype, device=images.device)
    wrap_triton(_pairwise_kernel)[(n * n_blocks,)](
        images, mask, t, d, out, h, w, n_blocks, DY=dy, DX=dx, K=len(dy), SCALE=scale,
        MEAN=mean, BLOCK=block, num_warps=4,
    )
    return out.sum(dim=1) / (h * w) if mean else out


def _sliding(images: torch.Tensor, mask: torch.Tensor | None, footprint: np.ndarray,
             out_dtype: torch.dtype | None) -> torch.Tensor:
    n, h, w = images.shape
    device = images.device
    offs, runs = _walk_tables(footprint.tobytes(), footprint.shape)
    k = len(offs)
    t, d, scale = _tables(k)
    offs, runs, t, d = (_on_device(table, images) for table in (offs, runs, t, d))
    seg, segments = _segments(n, h, w)
    total = n * h * segments
    # uint16: max + 1 bins, read from the images, except while tracing (no data): all 65536
    bins = 256 if images.dtype == torch.uint8 else 65536 if is_fake(images) else int(
        images.max()) + 1
    count_dtype = _count_dtype(k)
    per_wave = _SCRATCH_BYTES // (bins * count_dtype.itemsize) // _SLIDING_BLOCK * _SLIDING_BLOCK
    per_wave = min(max(_SLIDING_BLOCK, per_wave), total)
    block = block_size(per_wave, device, _SLIDING_BLOCK, least=_SLIDING_BLOCK)
    mean = out_dtype is None
    out = torch.empty(total if mean else (n, h, w), dtype=torch.float64 if mean else out_dtype,
                      device=device)
    for lane0 in range(0, total, per_wave):
        hist = torch.zeros(bins * per_wave, dtype=count_dtype, device=device)
        wrap_triton(_sliding_kernel)[(triton.cdiv(per_wave, block),)](
            images, mask, hist, offs, runs, t, d, out, h, w, k, len(runs), seg, segments,
            lane0, per_wave, total, SCALE=scale, MEAN=mean, BLOCK=block,
            num_warps=_SLIDING_WARPS, num_stages=1,
        )
    return out.view(n, h * segments).sum(dim=1) / (h * w) if mean else out


def _run(images: torch.Tensor, footprint: np.ndarray, mask: torch.Tensor | None,
         out_dtype: torch.dtype | None, variant: str | None) -> torch.Tensor:
    """The entropy map (out_dtype) or, with out_dtype None, the [N] float64 means."""
    images = images.to(torch.int32) if images.dtype == torch.uint16 else images
    mask = None if mask is None else mask.contiguous()
    variant = variant or variant_for(int(np.count_nonzero(footprint)))
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    kernel = _pairwise if variant == "pairwise" else _sliding
    return kernel(images, mask, footprint, out_dtype)


def local_entropy(
    images: torch.Tensor, footprint: np.ndarray, mask: torch.Tensor | None, out_dtype: np.dtype,
    *, variant: str | None = None,
) -> torch.Tensor:
    """[N, H, W] uint8/uint16 -> [N, H, W] local entropy in bits, `out_dtype` on their device.

    `variant` ("pairwise" or "sliding") overrides `variant_for`; both give the same values.
    """
    return _run(images, footprint, mask, getattr(torch, np.dtype(out_dtype).name), variant)


def mean_local_entropy(
    images: torch.Tensor, footprint: np.ndarray, mask: torch.Tensor | None,
    *, variant: str | None = None,
) -> torch.Tensor:
    """[N, H, W] uint8/uint16 -> [N] float64 mean of each local-entropy map (not materialised)."""
    return _run(images, footprint, mask, None, variant)
