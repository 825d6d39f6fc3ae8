"""ReLU rules: torch ops, C++ and Triton against plain-autograd oracles; the module and the swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frmap.kernels import (
    RULES,
    ReLUMask,
    ReLURule,
    relu_backward,
    relu_forward,
    relu_rule,
    swap_relus,
)
from frmap.kernels.eager.relu import CHUNK

from helpers import assert_identical


def oracle(x: torch.Tensor, grad: torch.Tensor, rule: str) -> torch.Tensor:
    """R_in of `rule` by plain autograd on float64 copies: a tensor hook, no custom Function."""
    x = x.detach().double().requires_grad_()
    # deconvnet ignores f: the ReLU's own backward becomes the identity
    y = x + (torch.relu(x) - x).detach() if rule == "deconvnet" else torch.relu(x)
    if rule != "gradient":
        y.register_hook(lambda g: g.clamp(min=0))  # (R > 0) * R
    y.backward(grad.double())
    return x.grad


def sample(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Normal values with about 10% exact zeros (f = 0 is not > 0; R = 0 is not > 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x.masked_fill(torch.rand(shape, generator=g) < 0.1, 0.0).to(dtype)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(1, 3),
}


CPU = pytest.param("cpu", marks=pytest.mark.needs_extension)
# the C++ kernels take float32/float64 (auto runs them there, torch ops for float16)
DTYPE_BACKENDS = [
    pytest.param(dtype, backend, marks=pytest.mark.needs_extension if backend == "cpu" else ())
    for dtype in (torch.float32, torch.float64, torch.float16)
    for backend in ("auto", "torch", "cpu")
    if not (backend == "cpu" and dtype == torch.float16)
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("dtype", "backend"), DTYPE_BACKENDS)
def test_rule_matches_autograd_oracle(rule, layout, dtype, backend):
    x = LAYOUTS[layout](sample((2, 5, 6, 7), 0, dtype)).requires_grad_()
    grad = sample(x.shape, 1, dtype)
    y = relu_rule(x, rule, backend=backend)
    assert_identical(y, torch.relu(x.detach()), "forward")
    y.backward(grad)
    assert_identical(x.grad, oracle(x, grad, rule).to(dtype), f"{rule} backward")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", ["torch", CPU])
def test_module_matches_oracle_across_chunks(rule, backend):
    """More than one torch-path chunk (C++: thread), and a length not a multiple of 8."""
    x = sample((CHUNK + 13,), 2).requires_grad_()
    grad = sample(x.shape, 3)
    ReLURule(rule, backend)(x).backward(grad)
    assert_identical(x.grad, oracle(x, grad, rule).float(), f"{rule} backward")


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_mask_is_bit_packed_lsb_first(backend):
    x = torch.tensor([1.0, -1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0, 5.0, -2.0, 7.0])
    y, mask = relu_forward(x, "guided", backend=backend)
    assert isinstance(mask, ReLUMask) and mask.shape == x.shape and not mask.channels_last
    assert mask.bits.dtype == torch.uint8
    assert mask.bits.tolist() == [0b00011001, 0b00000101]
    assert_identical(y, torch.relu(x), "forward")
    assert relu_forward(x, "deconvnet")[1] is None


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", ["torch", CPU])
def test_inplace_pair(rule, backend):
    x = sample((3, 4, 5, 6), 4).contiguous(memory_format=torch.channels_last)
    grad = sample(x.shape, 5)
    expected = oracle(x, grad, rule).float()
    f = x.clone()
    y, mask = relu_forward(f, rule, inplace=True, backend=backend)
    assert y.data_ptr() == f.data_ptr()
    assert mask is None or mask.channels_last
    r = grad.contiguous(memory_format=torch.channels_last)
    out = relu_backward(r, mask, rule, inplace=True, backend=backend)
    assert out.data_ptr() == r.data_ptr()
    assert_identical(out, expected, f"{rule} in place")


def check_matches_torch(shape: tuple[int, ...], rule: str, backend: str,
                        dtype=torch.float32, device: str = "cpu") -> None:
    """`backend` gives torch's outputs and mask bytes exactly."""
    x = sample(shape, 6, dtype).to(device)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = sample(shape, 7, dtype).to(device)
    y_t, m_t = relu_forward(x, rule, backend="torch")
    y_k, m_k = relu_forward(x, rule, backend=backend)
    assert_identical(y_k, y_t, f"{backend} forward")
    if m_t is not None:
        assert m_k.channels_last == m_t.channels_last
        assert torch.equal(m_k.bits, m_t.bits), f"{backend} mask bytes differ"
    assert_identical(relu_backward(grad, m_k, rule, backend=backend),
                 relu_backward(grad, m_t, rule, backend="torch"), f"{backend} backward")


SHAPES = [(1,), (7,), (8,), (1000,), (70_001,), (2, 3, 17, 19)]


@pytest.mark.needs_extension
@pytest.mark.parametrize("shape", [*SHAPES, (1 << 19, 3)])  # the last: several threads
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_torch_exactly(shape, rule, dtype):
    check_matches_torch(shape, rule, "cpu", dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_triton_matches_torch_exactly(shape, rule, triton_device):
    check_matches_torch(shape, rule, "triton", device=triton_device)


def test_triton_through_autograd(triton_device):
    x = sample((4, 3, 8, 8), 8).to(triton_device).requires_grad_()
    grad = sample(x.shape, 9).to(triton_device)
    relu_rule(x, "guided", backend="triton").backward(grad)
    assert_identical(x.grad, oracle(x, grad, "guided").float(), "triton guided")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True),
                                  nn.Sequential(nn.Conv2d(4, 4, 3), self.shared))
        self.head = nn.ModuleDict({"act": nn.ReLU(inplace=True)})

    def forward(self, x):
        return self.head["act"](self.shared(self.body(x)) - 0.1)


def test_swap_relus_swaps_all_and_restores():
    torch.manual_seed(0)
    net = Net()
    before = list(net.named_modules(remove_duplicate=False))
    x = torch.rand(2, 3, 9, 9)
    expected = net(x)
    with swap_relus(net, "deconvnet") as names:
        assert set(names) == {"shared", "body.1", "body.2.1", "head.act"}
        assert not any(type(m) is nn.ReLU for m in net.modules())
        assert all(m.rule == "deconvnet" for m in net.modules() if isinstance(m, ReLURule))
        assert_identical(net(x), expected, "forward while swapped")
    after = list(net.named_modules(remove_duplicate=False))
    assert [(n, id(m)) for n, m in after] == [(n, id(m)) for n, m in before]
    assert_identical(net(x), expected, "forward after")


def test_swap_relus_restores_on_error():
    net = Net()
    before = [id(m) for m in net.modules()]
    with pytest.raises(KeyError), swap_relus(net):
        raise KeyError("boom")
    assert [id(m) for m in net.modules()] == before


def test_bad_input():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="unknown rule"):
        relu_rule(x, "lrp")
    with pytest.raises(ValueError, match="unknown rule"):
        ReLURule("lrp")
    with pytest.raises(ValueError, match="unknown backend"):
        relu_forward(x, "guided", backend="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        relu_forward(torch.ones(4, dtype=torch.int64), "guided")
    with pytest.raises(ValueError, match="cpu backend takes float32/float64"):
        relu_forward(x.half(), "guided", backend="cpu")
    with pytest.raises(ValueError, match="needs the ReLUMask"):
        relu_backward(x, None, "guided")
    _, mask = relu_forward(x, "gradient")
    with pytest.raises(ValueError, match="shape"):
        relu_backward(torch.randn(2, 8), mask, "gradient")
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        relu_forward(x.t(), "guided", inplace=True)
    with pytest.raises(ValueError, match="unknown rule"), swap_relus(Net(), "saliency"):
        pass
