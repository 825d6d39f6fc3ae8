"""The one dispatch policy on torch tensors: what `auto` picks per op family, and named backends
that cannot run raising instead of falling back. Tensor inputs of the entropy ops keep their kind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels import _dispatch, torch_ops

from helpers import assert_close, random_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.needs_extension
@pytest.mark.parametrize(("family", "data", "expected"), [
    ("entropy", torch.zeros(4, 4, dtype=torch.uint8), "cpu"),
    ("response", torch.zeros(1, 1, 4, 4), "cpu"),
    ("relu", torch.zeros(4), "cpu"),
    ("relu", torch.zeros(4, dtype=torch.float16), "torch"),
    ("pooling", torch.zeros(1, 1, 4, 4, dtype=torch.float64), "cpu"),
    ("pooling", torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16), "torch"),
])
def test_auto_on_cpu_tensors(family, data, expected):
    assert K.resolve_backend("auto", data, family=family) == expected


@cuda
@pytest.mark.parametrize(("family", "expected"), [
    ("entropy", "triton"), ("response", "triton"), ("relu", "triton"), ("pooling", "torch"),
])
def test_auto_on_cuda_tensors(family, expected):
    data = torch.zeros(1, 1, 4, 4, device="cuda")
    assert K.resolve_backend("auto", data, family=family) == expected


def test_auto_falls_back_only_where_the_cpu_backend_is_missing(monkeypatch):
    monkeypatch.setattr(_dispatch, "unavailable_reason",
                        lambda backend, family="entropy": "not built" if backend == "cpu" else None)
    # the resolution is cached per process; this test fakes what is installed
    monkeypatch.setattr(_dispatch, "_resolved", _dispatch._resolved.__wrapped__)
    monkeypatch.setattr(torch_ops, "_direct", torch_ops._direct.__wrapped__)
    image = np.zeros((4, 4), np.uint8)
    assert K.resolve_backend("auto", image) == "reference"
    assert K.resolve_backend("auto", torch.zeros(4), family="relu") == "torch"
    with pytest.raises(RuntimeError, match="the cpu backend is unavailable: not built"):
        K.local_entropy(image, disk(1), backend="cpu")
    with pytest.raises(RuntimeError, match="the cpu backend is unavailable: not built"):
        K.relu_forward(torch.zeros(4), "guided", backend="cpu")


def test_named_backend_never_falls_back(monkeypatch):
    off_cpu = torch.zeros(4, 4, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="cpu backend takes CPU data, got a tensor on meta"):
        K.resolve_backend("cpu", off_cpu)
    with pytest.raises(ValueError, match="cpu backend takes float32/float64 CPU tensors"):
        K.resolve_backend("cpu", off_cpu.float(), family="pooling")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton backend takes CUDA tensors"):
        K.resolve_backend("triton", torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown backend 'triton'; choose one of auto, torch"):
        K.max_pool_offsets(torch.zeros(1, 1, 4, 4), 2, backend="triton")


@pytest.mark.needs_extension
def test_entropy_of_tensors_is_a_tensor():
    image = random_image(np.random.default_rng(11), (3, 33, 29))
    expected = np.stack([skimage_entropy(x, disk(3)) for x in image])
    t = K.local_entropy(torch.from_numpy(image), disk(3), backend="cpu")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    assert_close(t.numpy(), expected, 1e-9, "torch input")
    out = torch.empty(image.shape, dtype=torch.float32)
    assert K.local_entropy(torch.from_numpy(image), disk(3), out=out, backend="cpu") is out
    assert_close(out.numpy(), expected, 1e-5, "torch float32 out")
    scores = K.mean_local_entropy(torch.from_numpy(image), torch.from_numpy(disk(3)),
                                  mask=torch.ones(33, 29, dtype=torch.bool), backend="cpu")
    assert isinstance(scores, torch.Tensor)
    assert_close(scores.numpy(), expected.mean(axis=(-2, -1)), 1e-9)


@pytest.mark.needs_extension
def test_response_of_tensors_is_a_tensor():
    rng = np.random.default_rng(9)
    responses = rng.standard_normal((2, 3, 12, 10)).astype(np.float16)
    expected = K.response_to_image(responses.astype(np.float32), backend="reference")
    got = K.response_to_image(torch.from_numpy(responses), backend="cpu")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)
    scores = K.response_score(torch.from_numpy(responses), disk(1), backend="cpu")
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64
    assert_close(scores.numpy(), [skimage_entropy(x, disk(1)).mean() for x in expected], 1e-9)
