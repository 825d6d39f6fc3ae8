"""The triton backend against scikit-image (entropy) and numpy/PIL (response images).

Every kernel variant runs on CUDA tensors where a GPU is present, else on CPU tensors through
the Triton interpreter (the `triton_device` fixture); on a CUDA host the CPU cases skip, so
compiled Triton never sees a CPU tensor.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels import reference
from frmap.kernels._dispatch import interpreting

from helpers import (
    ENTROPY_ATOL,
    FOOTPRINTS,
    assert_close,
    assert_levels_equal,
    entropy_cases,
    random_footprint,
    random_image,
    smooth_image,
    unrounded_levels,
)

triton_entropy = pytest.importorskip("frmap.kernels.triton.entropy")

needs_interpreter = pytest.mark.skipif(
    not interpreting() or torch.cuda.is_available(),
    reason="CPU tensors go to Triton only through the interpreter, and only where there is no GPU",
)

VARIANTS = triton_entropy.VARIANTS

# Footprints beyond the crossover (more than PAIRWISE_MAX_K pixels), regular and irregular.
LARGE_FOOTPRINTS = {
    "disk4": disk(4),
    "irregular8x9": random_footprint(np.random.default_rng(8), (8, 9), p=0.7),
}
ALL_FOOTPRINTS = {**FOOTPRINTS, **LARGE_FOOTPRINTS}

# Smaller than most footprints, one row, one column; (12, 34): two row segments in the sliding
# kernel and borders on every side.
SHAPES = [(1, 1), (5, 3), (1, 17), (13, 1), (12, 34)]


def expected_entropy(images: np.ndarray, footprint, mask=None) -> np.ndarray:
    """scikit-image's entropy of every [H, W] image of a batch (mask: batch or spatial)."""
    h, w = images.shape[-2:]
    flat = images.reshape(-1, h, w)
    masks = (len(flat) * [None] if mask is None
             else np.broadcast_to(mask, images.shape).reshape(-1, h, w))
    with warnings.catch_warnings():  # skimage warns that 65536 bins are slow
        warnings.filterwarnings("ignore", message="Bad rank filter performance")
        maps = [skimage_entropy(np.ascontiguousarray(x), footprint,
                                mask=None if m is None else np.ascontiguousarray(m))
                for x, m in zip(flat, masks, strict=True)]
    return np.stack(maps).reshape(images.shape)


def on(device: str, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def entropy(images, footprint, variant, mask=None, out_dtype=np.float64) -> np.ndarray:
    """The backend's entropy map with the variant named, as float64 numpy."""
    got = triton_entropy.local_entropy(images, np.asarray(footprint, np.uint8), mask, out_dtype,
                                       variant=variant)
    assert got.device == images.device
    return got.cpu().numpy().astype(np.float64)


def mean_entropy(images, footprint, variant, mask=None) -> np.ndarray:
    got = triton_entropy.mean_local_entropy(images, np.asarray(footprint, np.uint8), mask,
                                            variant=variant)
    assert got.dtype == torch.float64 and got.device == images.device
    return got.cpu().numpy()


def test_variant_crossover():
    limit = triton_entropy.PAIRWISE_MAX_K
    assert all(fp.sum() > limit for fp in LARGE_FOOTPRINTS.values())
    assert triton_entropy.variant_for(1) == "pairwise"
    assert triton_entropy.variant_for(limit) == "pairwise"
    assert triton_entropy.variant_for(limit + 1) == "sliding"
    # the study's footprints: square(3), disk(2), disk(3) pairwise; disk(5), disk(7) sliding
    chosen = {k: triton_entropy.variant_for(int(fp.sum()))
              for k, fp in {"square3": np.ones((3, 3)), "disk2": disk(2), "disk3": disk(3),
                            "disk5": disk(5), "disk7": disk(7)}.items()}
    assert chosen == {"square3": "pairwise", "disk2": "pairwise", "disk3": "pairwise",
                      "disk5": "sliding", "disk7": "sliding"}


@pytest.mark.triton_interpret
@needs_interpreter
@pytest.mark.parametrize("fp_name", ["disk3", "disk4"])
def test_public_op_runs_the_chosen_variant(monkeypatch, fp_name):
    fp = ALL_FOOTPRINTS[fp_name]
    ran = []
    for name in VARIANTS:
        kernel = getattr(triton_entropy, f"_{name}")
        monkeypatch.setattr(triton_entropy, f"_{name}",
                            lambda *a, name=name, kernel=kernel: ran.append(name) or kernel(*a))
    images = random_image(np.random.default_rng(1), (1, 9, 10))
    got = K.local_entropy(torch.from_numpy(images), fp, backend="triton")
    assert ran == [triton_entropy.variant_for(int(fp.sum()))]
    assert_close(got, expected_entropy(images, fp), 1e-9, fp_name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fp_name", list(ALL_FOOTPRINTS))
def test_variant_matches_skimage(triton_device, variant, fp_name):
    rng = np.random.default_rng(list(ALL_FOOTPRINTS).index(fp_name))
    fp = ALL_FOOTPRINTS[fp_name]
    # the large footprints (slow under the interpreter in the pairwise kernel): two shapes
    for shape in SHAPES if fp_name in FOOTPRINTS else SHAPES[1::3]:
        # full range, and few levels so that windows repeat values
        images = np.stack([random_image(rng, shape), random_image(rng, shape, high=5)])
        got = entropy(on(triton_device, images), fp, variant)
        assert_close(got, expected_entropy(images, fp), 1e-9, f"{variant} {fp_name} {shape}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("high", [3, 1000, 65536])
def test_uint16(triton_device, variant, high):
    rng = np.random.default_rng(high)
    images = random_image(rng, (2, 17, 21), np.uint16, high)
    images[0, 0, 0] = high - 1
    for fp in (disk(2), np.ones((2, 3), np.uint8)):
        got = entropy(on(triton_device, images), fp, variant)
        assert_close(got, expected_entropy(images, fp), 1e-9, f"{variant} uint16 high={high}")


def test_several_programs_per_image(triton_device):
    """More pixels than one interpreter program holds (2**16): the pairwise kernel's blocks
    and per-program partial sums for the mean."""
    images = random_image(np.random.default_rng(6), (1, 300, 230), high=16)
    fp = np.ones((3, 3), np.uint8)
    expected = expected_entropy(images, fp)
    assert_close(entropy(on(triton_device, images), fp, "pairwise"), expected, 1e-9, "map")
    means = mean_entropy(on(triton_device, images), fp, "pairwise")
    assert_close(means, expected.mean(axis=(1, 2)), 1e-9, "mean")


@pytest.mark.triton_interpret
@needs_interpreter
def test_sliding_in_waves(monkeypatch):
    """A scratch buffer too small for all lanes at once: the lanes run in several launches."""
    monkeypatch.setattr(triton_entropy, "_SCRATCH_BYTES", 256 * 300)  # 256 lanes per wave
    images = random_image(np.random.default_rng(2), (3, 100, 7))
    mask = np.random.default_rng(3).random(images.shape) < 0.8
    fp = disk(2)
    got = entropy(torch.from_numpy(images), fp, "sliding", torch.from_numpy(mask.astype(np.uint8)))
    assert_close(got, expected_entropy(images, fp, mask), 1e-9, "waves")
    means = mean_entropy(torch.from_numpy(images), fp, "sliding")
    assert_close(means, expected_entropy(images, fp).mean(axis=(1, 2)), 1e-9, "wave means")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_constant_image_is_exactly_zero(triton_device, variant, dtype):
    images = on(triton_device, np.full((2, 9, 11), 200, dtype))
    for fp in (FOOTPRINTS["irregular"], FOOTPRINTS["even4x4"]):
        assert (entropy(images, fp, variant) == 0).all()
        assert (mean_entropy(images, fp, variant) == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("shape", "k"), [((1, 2), 1), ((2, 2), 2), ((2, 4), 3), ((4, 4), 4),
                                          ((4, 4), 2), ((4, 8), 5), ((8, 8), 3), ((2, 3), 1),
                                          ((3, 4), 2), ((3, 8), 3)])
def test_equally_frequent_values_give_exactly_k_bits(triton_device, variant, shape, k):
    """Every full window of a pattern tiled with the footprint's period holds 2**k values
    equally often (windows of 2**j pixels, and of 6, 12 or 24): exactly k bits, as
    scikit-image gives them (its own test asserts ==)."""
    fh, fw = shape
    pattern = (np.arange(fh)[:, None] * fw + np.arange(fw)[None, :]) % 2**k
    images = np.tile(pattern, (3, 3)).astype(np.uint8)[None] * 7
    fp = np.ones(shape, np.uint8)
    got = entropy(on(triton_device, images), fp, variant)[0]
    inner = (slice(fh // 2, images.shape[1] - (fh - 1 - fh // 2)),
             slice(fw // 2, images.shape[2] - (fw - 1 - fw // 2)))
    assert (got[inner] == k).all(), np.unique(got[inner])
    assert (expected_entropy(images, fp)[0][inner] == k).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_kind", ["per_image", "spatial"])
def test_mask_and_batch(triton_device, variant, mask_kind):
    rng = np.random.default_rng(3)
    images = random_image(rng, (2, 2, 13, 17), np.uint8, 7)
    mask = rng.random(images.shape if mask_kind == "per_image" else images.shape[-2:]) < 0.6
    expected = expected_entropy(images, disk(2), mask)
    flat_mask = np.broadcast_to(mask, images.shape).reshape(4, 13, 17).astype(np.uint8)
    flat_mask = on(triton_device, flat_mask)
    flat = on(triton_device, images.reshape(4, 13, 17))
    got = entropy(flat, disk(2), variant, flat_mask)
    assert_close(got.reshape(images.shape), expected, 1e-9, f"{mask_kind} mask")
    means = mean_entropy(flat, disk(2), variant, flat_mask)
    assert_close(means, expected.mean(axis=(-2, -1)).reshape(4), 1e-9, f"{mask_kind} means")


def test_public_op_with_mask(triton_device):
    rng = np.random.default_rng(4)
    images = random_image(rng, (2, 2, 9, 40), np.uint8, 7)  # two row segments when sliding
    mask = rng.random(images.shape[-2:]) < 0.6
    for fp in (disk(2), disk(4)):
        got = K.local_entropy(on(triton_device, images), fp, mask=on(triton_device, mask),
                              backend="triton")
        assert got.shape == images.shape and got.dtype == torch.float64
        assert_close(got.cpu(), expected_entropy(images, fp, mask), 1e-9, "public op, mask")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fully_masked_gives_zero(triton_device, variant):
    images = on(triton_device, random_image(np.random.default_rng(0), (1, 6, 6)))
    mask = torch.zeros((1, 6, 6), dtype=torch.uint8, device=triton_device)
    assert (entropy(images, disk(1), variant, mask) == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_out(triton_device, variant):
    images = random_image(np.random.default_rng(11), (2, 21, 19))
    got = triton_entropy.local_entropy(on(triton_device, images), disk(3).astype(np.uint8), None,
                                       np.float32, variant=variant)
    assert got.dtype == torch.float32
    atol = ENTROPY_ATOL[np.dtype(np.float32)]
    assert_close(got.cpu(), expected_entropy(images, disk(3)), atol, "float32 out")


def test_public_float32_out(triton_device):
    images = random_image(np.random.default_rng(12), (3, 17, 15))
    out = torch.empty(images.shape, dtype=torch.float32, device=triton_device)
    got = K.local_entropy(on(triton_device, images), disk(2), out=out, backend="triton")
    assert got is out
    atol = ENTROPY_ATOL[np.dtype(np.float32)]
    assert_close(out.cpu(), expected_entropy(images, disk(2)), atol, "float32 out")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fp_name", ["disk1", "disk3", "even4x4", "one", "disk4"])
def test_mean_local_entropy(triton_device, variant, fp_name):
    rng = np.random.default_rng(len(fp_name))
    images = np.stack([smooth_image(rng, (16, 40), sigma=2.0) for _ in range(2)])
    fp = ALL_FOOTPRINTS[fp_name]
    got = mean_entropy(on(triton_device, images), fp, variant)
    assert got.shape == (2,)
    assert_close(got, expected_entropy(images, fp).mean(axis=(1, 2)), 1e-9, fp_name)


def test_public_mean_and_non_contiguous_input(triton_device):
    base = on(triton_device, random_image(np.random.default_rng(5), (2, 24, 30)))
    view = base.transpose(1, 2)
    expected = expected_entropy(view.cpu().numpy(), disk(2))
    assert_close(K.local_entropy(view, disk(2), backend="triton").cpu(), expected, 1e-9)
    means = K.mean_local_entropy(view, disk(2), backend="triton")
    assert means.shape == (2,)
    assert_close(means.cpu(), expected.mean(axis=(1, 2)), 1e-9)


# the fixture's device is the same for every example
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=entropy_cases(max_size=16, max_footprint=7), variant=st.sampled_from(VARIANTS))
def test_property_matches_skimage(triton_device, case, variant):
    image, fp, mask = case
    got = entropy(on(triton_device, image[None]), fp, variant,
                  None if mask is None else on(triton_device, mask[None].astype(np.uint8)))
    assert_close(got[0], expected_entropy(image, fp, mask), 1e-9, variant)


def random_responses(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Heavy-tailed responses: most pixels near zero, a few far out (clipped levels)."""
    return (rng.standard_normal(shape) * rng.exponential(1.0, shape) ** 2).astype(dtype)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_response_image(triton_device, channels, dtype):
    rng = np.random.default_rng(channels)
    forgiven = 0
    # (150, 150) x 3 channels: the moments of one image span two interpreter programs.
    for shape in [(2, channels, 1, 1), (2, channels, 1, 9), (2, channels, 17, 23),
                  (1, channels, 150, 150)]:
        responses = random_responses(rng, shape, dtype)
        # far from zero: the moments must not cancel (mean 1000, std ~1)
        for r in (responses, (responses + 1000).astype(dtype)):
            got = K.response_to_image(on(triton_device, r), backend="triton")
            assert got.dtype == torch.uint8 and got.shape == (shape[0], *shape[2:])
            forgiven += assert_levels_equal(got.cpu(), reference.response_image(r),
                                            unrounded_levels(r))
    # A level within 1e-6 of an integer is rare (~1e-6 per value): expect (almost) none.
    assert forgiven <= 2, f"{forgiven} levels differ on a rounding boundary"


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_response_is_flat_127(triton_device, channels):
    responses = torch.zeros((2, channels, 5, 7), device=triton_device)
    assert (K.response_to_image(responses, backend="triton") == 127).all()
    assert (K.response_score(responses, disk(2), backend="triton") == 0).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fp_name", ["disk2", "square3", "irregular", "disk4"])
def test_response_score(triton_device, channels, fp_name):
    rng = np.random.default_rng(channels + len(fp_name))
    responses = on(triton_device, random_responses(rng, (3, channels, 20, 45), np.float32))
    fp = ALL_FOOTPRINTS[fp_name]
    got = K.response_score(responses, fp, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (3,)
    images = K.response_to_image(responses, backend="triton").cpu().numpy()
    expected = expected_entropy(images, fp).mean(axis=(1, 2))
    assert_close(got.cpu(), expected, 1e-9, f"response score {fp_name}")
