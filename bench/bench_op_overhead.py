"""pytest-benchmark: what a registered torch operator costs per call, on inputs so small that
the call is mostly overhead.

Run with `pytest bench/bench_op_overhead.py --benchmark-only`. Groups: the local entropy of one
32x32 uint8 image (square(3), C++ backend), called as the backend's numpy function, as its
registered operator `torch.ops.frmap.local_entropy_cpu`, and through the public
`local_entropy` on numpy and on a tensor (which calls the operator); and the guided ReLU's
forward kernel on 8x16x16 floats, direct (what the reverse walk calls in eager mode) and as the
operator `torch.ops.frmap.relu_forward_cpu` (what torch.compile sees).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frmap.kernels import cpu, local_entropy, torch_ops

FOOTPRINT = np.ones((3, 3), np.uint8)
ENTROPY_CALLS = ["backend function", "registered op", "local_entropy numpy",
                 "local_entropy tensor"]


@pytest.mark.parametrize("call", ENTROPY_CALLS)
def test_entropy_call(benchmark, call):
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32), dtype=np.uint8)
    tensor = torch.from_numpy(image)
    values, shape = torch_ops.footprint_constant(FOOTPRINT, (0, 0, 0))
    calls = {
        "backend function": lambda: cpu.local_entropy(image, FOOTPRINT, None,
                                                      np.dtype(np.float64)),
        "registered op": lambda: torch.ops.frmap.local_entropy_cpu(
            tensor, list(values), list(shape), None, torch.float64),
        "local_entropy numpy": lambda: local_entropy(image, FOOTPRINT, backend="cpu"),
        "local_entropy tensor": lambda: local_entropy(tensor, FOOTPRINT, backend="cpu"),
    }
    expected = cpu.local_entropy(image, FOOTPRINT, None, np.dtype(np.float64))
    np.testing.assert_array_equal(np.asarray(calls[call]()), expected)
    benchmark.group = "local_entropy 1x32x32 uint8 square(3), cpu"
    benchmark.extra_info.update(call=call, threads=torch.get_num_threads())
    benchmark(calls[call])


@pytest.mark.parametrize("call", ["backend function", "registered op"])
def test_relu_forward_call(benchmark, call):
    x = torch.randn(8 * 16 * 16, generator=torch.Generator().manual_seed(0))
    y, bits = torch.empty_like(x), torch.empty(x.numel() // 8, dtype=torch.uint8)
    fn = cpu.relu_forward if call == "backend function" else torch.ops.frmap.relu_forward_cpu
    fn(x, y, bits)
    assert torch.equal(y, x.clamp_min(0))
    benchmark.group = "relu_forward 8x16x16 float32 guided mask, cpu"
    benchmark.extra_info.update(call=call, threads=torch.get_num_threads())
    benchmark(fn, x, y, bits)
