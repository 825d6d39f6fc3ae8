"""ReLU backward rules for feature responses: plain gradient, deconvnet, guided backpropagation.

At a ReLU with input `f` and the signal `R` arriving from above (METHOD section 1, step 2):

    gradient   R_in = (f > 0) * R
    deconvnet  R_in = (R > 0) * R
    guided     R_in = (f > 0) * (R > 0) * R

The forward is the plain ReLU; it records `f > 0` as a `ReLUMask`, 1 bit per element (bit i of
byte j is element 8j + i in the tensor's memory order; deconvnet needs no mask). `relu_forward`
and `relu_backward` are the two halves, `ReLURuleFunction` / `relu_rule` / `ReLURule` their
autograd forms, and `swap_relus` puts `ReLURule`s in place of a model's `nn.ReLU`s for the
length of a `with` block. The rules are not gradients by design: do not gradcheck them.

Backends (see `frmap.kernels._dispatch`): `triton` for CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1; `cpu`, the C++ kernels, for float32/float64 CPU tensors; `torch`, eager torch
ops on any device; `auto` picks Triton on CUDA, the C++ kernels where they run, else torch ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import torch_ops
from ._arrays import is_channels_last
from ._constants import RULES
from ._dispatch import check_backend


@dataclass(frozen=True)
class ReLUMask:
    """`f > 0` of one ReLU input, bit-packed.

    Attributes:
        bits: [ceil(numel / 8)] uint8; bit i of byte j is element 8j + i in memory order.
        shape: the shape of `f`.
        channels_last: whether that memory order is channels-last (else contiguous).
    """

    bits: torch.Tensor
    shape: torch.Size
    channels_last: bool


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch tensor, got {kind}")


def _flat(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order."""
    return x.permute(0, 2, 3, 1).reshape(-1) if channels_last else x.view(-1)


def relu_forward(x: torch.Tensor, rule: str, *, inplace: bool = False,
                 backend: str = "auto") -> tuple[torch.Tensor, ReLUMask | None]:
    """The ReLU, and the mask the rule's backward needs.

    Args:
        x: floating-point tensor `f`, any shape.
        rule: "gradient", "deconvnet" or "guided".
        inplace: write relu(f) into `x` (which must then be contiguous or channels-last).
        backend: "auto", "cpu", "torch" or "triton".

    Returns:
        relu(f), in `x`'s memory format, and its `ReLUMask` (None for deconvnet).
    """
    _check_rule(rule)
    _check_float(x, "x")
    channels_last = is_channels_last(x)
    if not channels_last and not x.is_contiguous():
        if inplace:
            raise ValueError("inplace=True needs a contiguous or channels-last tensor")
        x = x.contiguous()
    run = torch_ops.kernel("relu", "relu_forward", backend, x)
    y = x if inplace else torch.empty_like(x, memory_format=torch.preserve_format)
    bits = None
    if rule != "deconvnet":
        bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    run(_flat(x, channels_last), _flat(y, channels_last), bits)
    return y, None if bits is None else ReLUMask(bits, x.shape, channels_last)


def relu_backward(grad: torch.Tensor, mask: ReLUMask | None, rule: str, *, inplace: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """The rule's R_in from the signal `grad` at the ReLU output and the forward's mask.

    Args:
        grad: floating-point R, the shape of the ReLU input.
        mask: what `relu_forward` returned (ignored by deconvnet, which needs none).
        rule: "gradient", "deconvnet" or "guided".
        inplace: write R_in into `grad` where its layout allows.
        backend: "auto", "cpu", "torch" or "triton".

    Returns:
        R_in, in the mask's memory format.
    """
    _check_rule(rule)
    _check_float(grad, "grad")
    if rule == "deconvnet":
        mask = None
        channels_last = is_channels_last(grad)
    else:
        if not isinstance(mask, ReLUMask):
            raise ValueError(f"the {rule} rule needs the ReLUMask of the forward, got {mask!r}")
        if grad.shape != mask.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)}, the mask {tuple(mask.shape)}")
        channels_last = mask.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = grad.contiguous(memory_format=fmt)
    run = torch_ops.kernel("relu", "relu_backward", backend, dense)
    out = dense if inplace or dense is not grad else torch.empty_like(dense)
    run(_flat(dense, channels_last), None if mask is None else mask.bits,
        _flat(out, channels_last), rule)
    return out


class ReLURuleFunction(torch.autograd.Function):
    """ReLU whose backward applies a rule: `ReLURuleFunction.apply(x, rule, backend)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str, backend: str) -> torch.Tensor:
        y, ctx.mask = relu_forward(x, rule, backend=backend)
        ctx.rule, ctx.backend = rule, backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return relu_backward(grad, ctx.mask, ctx.rule, backend=ctx.backend), None, None


def relu_rule(x: torch.Tensor, rule: str = "guided", *, backend: str = "auto") -> torch.Tensor:
    """relu(x) whose backward applies `rule` ("gradient", "deconvnet" or "guided")."""
    _check_rule(rule)
    return ReLURuleFunction.apply(x, rule, backend)


class ReLURule(nn.Module):
    """`nn.ReLU` whose backward applies `rule`; never in place."""

    def __init__(self, rule: str = "guided", backend: str = "auto") -> None:
        super().__init__()
        _check_rule(rule)
        check_backend(backend, "relu")
        self.rule, self.backend = rule, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ReLURuleFunction.apply(x, self.rule, self.backend)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, backend={self.backend!r}"


@contextmanager
def swap_relus(model: nn.Module, rule: str = "guided", *,
               backend: str = "auto") -> Iterator[tuple[str, ...]]:
    """Replace every `nn.ReLU` below `model` (in-place ones too) by a `ReLURule` while inside.

    The original modules are put back when the block ends, also when it raises.

    Yields:
        The qualified names of the swapped modules.
    """
    _check_rule(rule)
    slots = [(f"{prefix}.{name}".lstrip("."), parent, name, child)
             for prefix, parent in model.named_modules(remove_duplicate=False)
             for name, child in parent.named_children() if isinstance(child, nn.ReLU)]
    try:
        for _, parent, name, _ in slots:
            setattr(parent, name, ReLURule(rule, backend))
        yield tuple(qualified for qualified, *_ in slots)
    finally:
        for _, parent, name, child in slots:
            setattr(parent, name, child)
