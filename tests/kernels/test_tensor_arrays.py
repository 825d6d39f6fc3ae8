"""Output dtype and DLPack arrays on torch data: float32 is the float64 result rounded once on
every backend (Triton through the interpreter on tiny shapes), and a DLPack array comes back as
its own kind on its own device (device memory through torch.from_dlpack, without a host copy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.morphology import disk

import frmap.kernels as K

from helpers import SLIDING, NamespacedArray, random_image


def sample(shape, device, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(random_image(rng, shape, np.uint8, 9)).to(device)


def assert_rounded_once(images: torch.Tensor, footprint: np.ndarray, backend: str) -> None:
    mask = torch.ones(images.shape[-2:], dtype=torch.bool, device=images.device)
    mask[1::3, ::2] = False
    exact = K.local_entropy(images, footprint, mask=mask, backend=backend)
    got = K.local_entropy(images, footprint, mask=mask, out_dtype=torch.float32, backend=backend)
    assert exact.dtype == torch.float64 and got.dtype == torch.float32
    assert got.device == images.device
    assert torch.equal(got, exact.float()), f"{int((got != exact.float()).sum())} differ"


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.needs_extension),
                                     "reference"])
def test_float32_is_float64_rounded_once_host(backend):
    for footprint in (disk(1), disk(4)):
        assert_rounded_once(sample((2, 17, 19), "cpu"), footprint, backend)


@pytest.mark.parametrize("footprint", [disk(1), SLIDING], ids=["pairwise", "sliding"])
def test_float32_is_float64_rounded_once_triton(footprint, triton_device):
    assert_rounded_once(sample((2, 6, 13), triton_device), footprint, "triton")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.needs_extension),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
def test_dlpack_array_round_trips_on_its_device(device):
    images = sample((2, 15, 16), device)
    array = NamespacedArray(images, torch.from_dlpack)
    got = K.local_entropy(array, disk(2), out_dtype=torch.float32)
    assert isinstance(got, NamespacedArray) and got.data.device == images.device
    assert torch.equal(got.data, K.local_entropy(images, disk(2), out_dtype=torch.float32))
    means = K.mean_local_entropy(array, disk(2))
    assert isinstance(means, NamespacedArray) and means.data.device == images.device
    assert torch.equal(means.data, K.mean_local_entropy(images, disk(2)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cupy_in_cupy_out_on_its_gpu():
    """A CuPy array (what cuCIM's users hold) is computed on its GPU and comes back as CuPy:
    no device-to-host copy, the values of the C++ kernels on the host data, float32 rounded
    once."""
    cupy = pytest.importorskip("cupy")
    host = random_image(np.random.default_rng(3), (2, 40, 50), np.uint8, 9)
    images = cupy.asarray(host)
    assert torch.from_dlpack(images).data_ptr() == images.data.ptr  # imported, not copied
    for footprint in (disk(1), disk(4)):
        got = K.local_entropy(images, footprint)
        assert isinstance(got, cupy.ndarray) and got.device == images.device
        np.testing.assert_allclose(cupy.asnumpy(got), K.local_entropy(host, footprint),
                                   rtol=0, atol=1e-9)
        single = K.local_entropy(images, footprint, out_dtype="float32")
        assert single.dtype == np.float32 and bool((single == got.astype(np.float32)).all())
        means = K.mean_local_entropy(images, footprint)
        assert isinstance(means, cupy.ndarray) and means.device == images.device
        np.testing.assert_allclose(cupy.asnumpy(means), K.mean_local_entropy(host, footprint),
                                   rtol=0, atol=1e-9)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        K.local_entropy(images, disk(1))
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "DtoH" in e.name]
    assert not copies, copies
