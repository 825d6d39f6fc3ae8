"""What a registered torch operator costs per call, on inputs so small that the call is mostly
overhead: `run`, `table` (`frmap bench overhead`), and the calls `bench_op_overhead.py` hands to
pytest-benchmark.

Two problems: the local entropy of one 32x32 uint8 image (square(3), C++ backend), called as the
backend's numpy function (the baseline), as its registered operator
`torch.ops.frmap.local_entropy_cpu`, and through the public `local_entropy` on numpy and on a
tensor (which calls the operator); and the guided ReLU's forward kernel on 8x16x16 floats, direct
(what the reverse walk calls in eager mode) and as the operator `torch.ops.frmap.relu_forward_cpu`
(what torch.compile sees). Each call's result is checked before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import frmap.bench.machine as machine
from frmap.bench.entropy import best_time
from frmap.kernels import cpu, local_entropy, torch_ops

ENTROPY_GROUP = "local_entropy 1x32x32 uint8 square(3), cpu"
RELU_GROUP = "relu_forward 8x16x16 float32 guided mask, cpu"
FOOTPRINT = np.ones((3, 3), np.uint8)


def entropy_calls() -> dict[str, Callable[[], object]]:
    """The four ways to call the entropy of one small image, each checked against the backend
    function (the first)."""
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
    for call in calls.values():
        np.testing.assert_array_equal(np.asarray(call()), expected)
    return calls


def relu_calls() -> dict[str, Callable[[], object]]:
    """The guided ReLU's forward kernel, direct (the baseline) and as the registered operator,
    each checked against `clamp_min(0)`."""
    x = torch.randn(8 * 16 * 16, generator=torch.Generator().manual_seed(0))
    y, bits = torch.empty_like(x), torch.empty(x.numel() // 8, dtype=torch.uint8)
    calls = {"backend function": lambda: cpu.relu_forward(x, y, bits),
             "registered op": lambda: torch.ops.frmap.relu_forward_cpu(x, y, bits)}
    for call in calls.values():
        y.zero_()
        call()
        assert torch.equal(y, x.clamp_min(0))
    return calls


def run(quick: bool = False) -> dict:
    """Time every call (best of many repeats); each group's first call is the baseline."""
    repeats = 200 if quick else 2000
    rows = []
    for group, calls in ((ENTROPY_GROUP, entropy_calls()), (RELU_GROUP, relu_calls())):
        seconds = {name: best_time(call, repeats) for name, call in calls.items()}
        base = next(iter(seconds.values()))
        rows += [{"group": group, "call": name, "seconds": t, "vs_backend": t / base}
                 for name, t in seconds.items()]
    return {"rows": rows, "threads": torch.get_num_threads(), "machine": machine.describe()}


def table(result: dict) -> str:
    """The result of `run` as a text table."""
    lines = [f"{'group':45} {'call':22} {'us':>9} {'x backend':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['group']:45} {r['call']:22} {r['seconds'] * 1e6:9.2f} "
                     f"{r['vs_backend']:10.2f}")
    lines.append(f"\n{result['threads']} torch threads\n" + machine.summary(result["machine"]))
    return "\n".join(lines)
