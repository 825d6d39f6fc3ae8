"""Max-pooling with one-byte offsets: both backends against torch's max_pool2d / max_unpool2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frmap.kernels import max_pool_offsets, max_unpool_offsets

BACKENDS = [pytest.param("cpu", marks=pytest.mark.needs_extension), "torch"]
LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
}


def sample(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Normal values with tied windows: a constant corner block and coarse-rounded values."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).round() / 4  # many ties inside windows
    x[:, :, :3, :3] = 0.5
    return x.to(dtype)


def reference(x: torch.Tensor, kernel, relu_first: bool = False):
    """max_pool2d's values and int64 indices (of relu(x) when `relu_first`)."""
    return F.max_pool2d(x.relu() if relu_first else x, kernel, return_indices=True)


CASES = [  # (N, C, H, W), kernel
    ((2, 5, 8, 8), (2, 2)),
    ((2, 37, 9, 7), (2, 3)),  # odd sizes: floor mode leaves rows and columns out
    ((1, 16, 5, 5), (3, 1)),
    ((3, 33, 4, 6), (1, 1)),
    ((2, 64, 64, 64), (2, 2)),  # over 2^18 elements: several threads
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "kernel"), CASES)
def test_matches_max_pool2d_and_its_unpool(backend, layout, dtype, shape, kernel):
    x = LAYOUTS[layout](sample(shape, 0, dtype))
    values, indices = reference(x, kernel)
    y, offsets = max_pool_offsets(x, kernel, backend=backend)
    assert offsets.dtype == torch.uint8 and offsets.shape == y.shape
    assert torch.equal(y, values)
    channels_last = layout == "channels_last" and shape[1] > 1
    for t in (y, offsets):
        assert t.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)
    r = sample(y.shape, 1, dtype)
    expected = F.max_unpool2d(r, indices, kernel, output_size=shape[-2:])
    got = max_unpool_offsets(r, offsets, kernel, shape[-2:], backend=backend)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "kernel"), CASES[:3])
def test_dead_first_is_the_argmax_of_pooling_after_a_relu(backend, shape, kernel):
    x = LAYOUTS["channels_last"](sample(shape, 2) - 1)  # many windows without a positive value
    values, indices = reference(x, kernel, relu_first=True)
    y, offsets = max_pool_offsets(x, kernel, dead_first=True, backend=backend)
    assert torch.equal(y.relu(), values)
    r = sample(y.shape, 3)
    assert torch.equal(max_unpool_offsets(r, offsets, kernel, shape[-2:], backend=backend),
                       F.max_unpool2d(r, indices, kernel, output_size=shape[-2:]))


@pytest.mark.needs_extension
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_wins_its_window_alike_in_both_backends(layout):
    x = sample((1, 20, 6, 6), 4)
    x[0, :, 0, 1] = float("nan")  # second element of the first window
    x[0, :, 1, 1] = float("nan")  # and the fourth
    x[0, :, 3, 2] = float("nan")
    x = LAYOUTS[layout](x)
    values = F.max_pool2d(x, 2)
    results = [max_pool_offsets(x, 2, backend=b) for b in ("cpu", "torch")]
    for y, offsets in results:
        torch.testing.assert_close(y, values, rtol=0, atol=0, equal_nan=True)
        assert (offsets[0, :, 0, 0] == 1).all()  # the first NaN
        assert (offsets[0, :, 1, 1] == 2).all()
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_is_reused_and_checked(backend):
    x = sample((2, 8, 6, 6), 5).contiguous(memory_format=torch.channels_last)
    y, offsets = max_pool_offsets(x, 2, backend=backend)
    r = sample(y.shape, 6).contiguous(memory_format=torch.channels_last)
    expected = max_unpool_offsets(r, offsets, 2, (6, 6), backend=backend)
    buffer = torch.full_like(x, 7.0)  # every element must be overwritten
    got = max_unpool_offsets(r, offsets, 2, (6, 6), out=buffer, backend=backend)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, expected)
    with pytest.raises(ValueError, match="out must be"):
        max_unpool_offsets(r, offsets, 2, (6, 6), out=torch.empty(2, 8, 6, 6), backend=backend)
    with pytest.raises(ValueError, match="out must be"):
        max_unpool_offsets(r, offsets, 2, (6, 6), out=buffer[:1], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_larger_than_the_image(backend):
    x = sample((2, 3, 1, 5), 7)
    y, offsets = max_pool_offsets(x, 2, backend=backend)
    assert y.shape == offsets.shape == (2, 3, 0, 2)
    out = max_unpool_offsets(y, offsets, 2, (1, 5), backend=backend)
    assert out.shape == x.shape and not out.any()


def test_bad_input():
    x = sample((1, 2, 4, 4), 8)
    y, offsets = max_pool_offsets(x, 2)
    with pytest.raises(ValueError, match="more than 256 elements"):
        max_pool_offsets(x, (17, 17))
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool_offsets(x, 0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] floating-point"):
        max_pool_offsets(torch.ones(1, 2, 4, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] floating-point"):
        max_pool_offsets(x[0], 2)
    with pytest.raises(ValueError, match="unknown backend"):
        max_pool_offsets(x, 2, backend="triton")
    with pytest.raises(ValueError, match="cpu backend takes float32/float64"):
        max_pool_offsets(x.half(), 2, backend="cpu")
    with pytest.raises(ValueError, match="offsets must be uint8"):
        max_unpool_offsets(y, offsets.long(), 2, (4, 4))
    with pytest.raises(ValueError, match="offsets must be uint8"):
        max_unpool_offsets(y, offsets[:, :1], 2, (4, 4))
    with pytest.raises(ValueError, match="does not pool to"):
        max_unpool_offsets(y, offsets, 2, (6, 4))
    with pytest.raises(TypeError, match="offsets must be a torch tensor"):
        max_unpool_offsets(y, offsets.numpy(), 2, (4, 4))
