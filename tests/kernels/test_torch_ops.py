"""frmap's ops as registered torch operators: `torch.library.opcheck` on every operator, and
torch.compile(fullgraph=True) / torch.export of functions calling `local_entropy` and
`mean_local_entropy`, the ReLU rules and the offset pooling equal to eager mode exactly.

Triton: CPU tensors through the interpreter run the operators eagerly and check their fake
(meta) functions; the interpreter cannot be traced into, so a subprocess without it checks that
torch.compile decomposes the Triton operators into their kernels (tracing only: nothing runs);
the CUDA cases run everything on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.morphology import disk

import frmap.kernels as K
from frmap.kernels import torch_ops

from helpers import SLIDING, assert_identical, random_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU = pytest.param("cpu", marks=pytest.mark.needs_extension)
OPS = ("local_entropy", "mean_local_entropy")
# opcheck's tests: all, and those that do not trace into the operator (the Triton interpreter
# cannot be traced)
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
NOT_TRACING = ALL_UTILS[:3]


def op_args(op: str, images: torch.Tensor, footprint: np.ndarray, masked: bool) -> tuple:
    """The registered operator's arguments for [N, H, W] images."""
    values, shape = torch_ops.footprint_constant(footprint, (0, 0, 0))
    mask = None
    if masked:
        mask = (torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) < 0.7)
        mask = mask.to(torch.uint8).to(images.device)
    dtype = (torch.float32,) if op == "local_entropy" else ()
    return (images, list(values), list(shape), mask, *dtype)


def sample(shape: tuple[int, ...], dtype=np.uint8, device: str = "cpu", seed: int = 0):
    return torch.from_numpy(random_image(np.random.default_rng(seed), shape, dtype, 7)).to(device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [CPU, "reference"])
@pytest.mark.parametrize(("dtype", "footprint"), [(np.uint8, disk(1)), (np.uint16, SLIDING)])
def test_opcheck_host_operators(op, backend, dtype, footprint):
    for masked in (False, True):
        args = op_args(op, sample((2, 7, 9), dtype), footprint, masked)
        torch.library.opcheck(torch_ops.operator(op, backend), args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("footprint", [disk(1), SLIDING], ids=["pairwise", "sliding"])
def test_opcheck_triton_operators(op, footprint, triton_device):
    tracing = triton_device == "cuda"
    for masked in (False, True):
        args = op_args(op, sample((2, 7, 9), device=triton_device), footprint, masked)
        torch.library.opcheck(torch_ops.operator(op, "triton"), args,
                              test_utils=ALL_UTILS if tracing else NOT_TRACING)


def _scores(images: torch.Tensor, mask: torch.Tensor, footprint: np.ndarray, backend: str):
    maps = K.local_entropy(images, footprint, mask=mask, out_dtype=torch.float32,
                           shift_x=1, backend=backend)
    return maps * 2, K.mean_local_entropy(images, footprint, mask=mask, backend=backend)


def assert_same(got, expected) -> None:
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.device == e.device
        assert_identical(g, e)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.needs_extension),
                                    pytest.param("cuda", marks=cuda)])
def test_compile_fullgraph_equals_eager(device):
    """One compiled function with both ops, a mask, a shift, float32 output and a batch."""
    images = sample((2, 3, 12, 17), device=device)
    mask = torch.rand(12, 17, generator=torch.Generator().manual_seed(0)).to(device) < 0.8
    footprint = disk(2)

    def fn(x, m):
        return _scores(x, m, footprint, "auto")

    expected = fn(images, mask)
    torch._dynamo.reset()
    assert_same(torch.compile(fn, fullgraph=True)(images, mask), expected)


@pytest.mark.parametrize(("backend", "device"), [
    ("cpu", "cpu"), ("reference", "cpu"), pytest.param("triton", "cuda", marks=cuda),
])
def test_export_equals_eager(backend, device):
    if backend == "cpu" and K.resolve_backend("auto", np.zeros(1)) != "cpu":
        pytest.skip("the C++ extension is not built")

    class Scores(torch.nn.Module):
        footprint = disk(2)

        def forward(self, x, m):
            return _scores(x, m, self.footprint, backend)

    images = sample((2, 12, 17), device=device)
    mask = torch.ones(12, 17, dtype=torch.bool, device=device)
    program = torch.export.export(Scores(), (images, mask))
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {f"frmap.{op}_{backend}.default" for op in OPS} <= called
    assert_same(program.module()(images, mask), Scores()(images, mask))


_TRACE_TRITON = r"""
import json, sys
import numpy as np, torch
from skimage.morphology import disk
from torch._dynamo.backends.common import aot_autograd
from frmap.kernels import torch_ops

graphs = []
class Traced(Exception):
    pass
def capture(gm, example_inputs):
    graphs.append(gm.code)
    def run(*args):
        raise Traced  # no GPU here: the graph is what is checked, nothing runs
    return run

out = []
# (footprint, image dtype, dynamic shapes): pairwise, and sliding with uint16's 65536 bins
for footprint, dtype, dynamic in [(disk(1), torch.uint8, False), (disk(4), torch.uint16, True)]:
    values, shape = torch_ops.footprint_constant(footprint, (0, 0, 0))
    args = (list(values), list(shape), None)
    fn = lambda x: (torch_ops.operator("local_entropy", "triton")(x, *args, torch.float32),
                    torch_ops.operator("mean_local_entropy", "triton")(x, *args))
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True,
                             dynamic=dynamic)
    try:
        compiled(torch.zeros(2, 20, 40, dtype=dtype))
    except Traced:
        out.append(graphs[-1])
print(json.dumps(out))
"""


def test_compile_sees_the_triton_kernels():
    """torch.compile traces the Triton operators into their kernels (triton_op + wrap_triton),
    pairwise (uint8, static shapes) and sliding (uint16, dynamic shapes): on CPU tensors without
    the interpreter, where tracing succeeds and only running would need a GPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TRACE_TRITON], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    graphs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(graphs) == 2
    for code in graphs:
        assert "triton_kernel_wrapper_functional" in code, code
        assert "frmap." not in code, code  # decomposed, not called as an opaque operator


def walk_args(op: str, device: str) -> list[tuple]:
    """Argument tuples of a walk operator on [2, 3, 8, 8] data (outputs allocated)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)
    flat, bits = x.view(-1), torch.empty(x.numel() // 8, dtype=torch.uint8, device=device)
    pooled = torch.empty(2, 3, 4, 4, device=device)
    offsets = torch.randint(0, 4, pooled.shape, dtype=torch.uint8, device=device)
    return {
        "relu_forward": [(flat, torch.empty_like(flat), b) for b in (bits, None)],
        "relu_backward": [(flat, bits.random_(0, 256), torch.empty_like(flat), rule)
                          for rule in ("gradient", "guided")],
        "max_pool": [(x, pooled, offsets.clone(), [2, 2], False, dead) for dead in (False, True)],
        "max_unpool": [(pooled.normal_(), offsets, torch.empty_like(x), [2, 2], False)],
    }[op]


@pytest.mark.parametrize(("op", "backend"), [
    pytest.param(op, b, marks=pytest.mark.needs_extension if b == "cpu" else ())
    for op in ("relu_forward", "relu_backward", "max_pool", "max_unpool")
    for b in ("cpu", "torch")
])
def test_opcheck_walk_operators(op, backend):
    for args in walk_args(op, "cpu"):
        torch.library.opcheck(getattr(torch.ops.frmap, f"{op}_{backend}"), args)


@pytest.mark.parametrize("op", ["relu_forward", "relu_backward"])
def test_opcheck_triton_walk_operators(op, triton_device):
    utils = ALL_UTILS if triton_device == "cuda" else NOT_TRACING
    for args in walk_args(op, triton_device):
        torch.library.opcheck(getattr(torch.ops.frmap, f"{op}_triton"), args, test_utils=utils)


def _guided_walk(x: torch.Tensor) -> torch.Tensor:
    """relu_rule, then a pool by offsets and its unpooling: the walk's ops, with autograd."""
    y = K.relu_rule(x, "guided")
    pooled, offsets = K.max_pool_offsets(y, 2, dead_first=True)
    return K.max_unpool_offsets(pooled, offsets, 2, x.shape[-2:]) + y


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.needs_extension),
                                    pytest.param("cuda", marks=cuda)])
def test_compile_relu_rule_and_pooling_equal_eager(device):
    """The forward and the rule's backward of a compiled function equal eager mode's exactly."""
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(3)).to(device)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    grads = []
    for fn in (_guided_walk, torch.compile(_guided_walk, fullgraph=True)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad)
        grads.append((out.detach(), leaf.grad))
    assert_same(grads[1], grads[0])


def test_export_relu_and_pooling():
    class Forward(torch.nn.Module):
        def forward(self, x):
            y, mask = K.relu_forward(x, "guided", backend="torch")
            pooled, offsets = K.max_pool_offsets(y, 2, backend="torch")
            return pooled, offsets, mask.bits

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    program = torch.export.export(Forward(), (x,))
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"frmap.relu_forward_torch.default", "frmap.max_pool_torch.default"} <= called
    assert_same(program.module()(x), Forward()(x))
