"""pytest-benchmark: what a registered torch operator costs per call, on inputs so small that
the call is mostly overhead.

Run with `pytest bench/bench_op_overhead.py --benchmark-only`. The groups, the calls and their
checks are those of `frmap.bench.overhead` (see its docstring); the backend function is each
group's baseline.
"""

from __future__ import annotations

import pytest
import torch

from frmap.bench.overhead import ENTROPY_GROUP, RELU_GROUP, entropy_calls, relu_calls


@pytest.mark.parametrize("call", list(entropy_calls()))
def test_entropy_call(benchmark, call):
    benchmark.group = ENTROPY_GROUP
    benchmark.extra_info.update(call=call, threads=torch.get_num_threads())
    benchmark(entropy_calls()[call])


@pytest.mark.parametrize("call", list(relu_calls()))
def test_relu_forward_call(benchmark, call):
    benchmark.group = RELU_GROUP
    benchmark.extra_info.update(call=call, threads=torch.get_num_threads())
    benchmark(relu_calls()[call])
