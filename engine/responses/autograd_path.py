"""The autograd path: responses of any model whose ReLUs are `nn.ReLU` modules.

The model's `nn.ReLU`s are swapped for `ReLURule`s and autograd differentiates the target with
respect to the images only (no parameter gradient). A rectifier that is not an `nn.ReLU` module
would silently back-propagate the plain gradient, so the forward runs under two guards that
raise, naming the module that runs it: one on the functions (`torch.relu`, `F.relu`,
`Tensor.relu`), one below them on the operators whatever calls them (`torch.ops.aten.relu`,
`clamp` / `clamp_min` with a lower bound of 0, `hardtanh` from 0 as in `nn.ReLU6`,
`threshold`). A rectifier written as arithmetic (`torch.maximum(x, 0)`, `torch.where`) is not
seen. With a rule other than "gradient", a forward in which no swapped `nn.ReLU` runs raises
too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from frmap.engine.responses.targets import conv_max_index, target_indices
from frmap.kernels import ReLURule, swap_relus

_FUNCTIONAL_RELUS = {F.relu: "torch.nn.functional.relu", F.relu_: "torch.nn.functional.relu_",
                     torch.relu: "torch.relu", torch.relu_: "torch.relu_",
                     torch.Tensor.relu: "Tensor.relu", torch.Tensor.relu_: "Tensor.relu_"}


def autograd_responses(model: nn.Module, net: nn.Module, x: torch.Tensor,
                       classes: torch.Tensor | None, rule: str) -> torch.Tensor:
    """[N, C, H, W] responses of `x` through `net` (`model`, or `model` behind a normalisation).

    Args:
        model: the module whose `nn.ReLU`s take the rule.
        net: what the images go through.
        x: [N, C, H, W] float images on the model's device.
        classes: [N] class indices (-1: the top class), or None for conv_max.
        rule: "gradient", "deconvnet" or "guided".
    """
    x = x.detach().clone().requires_grad_()
    with torch.enable_grad(), swap_relus(model, rule), _trace_relus(model) as trace, \
            no_functional_relu(model):
        out = net(x)
    if rule != "gradient" and not any(isinstance(m, ReLURule) for m, _ in trace):
        raise ValueError(f"no nn.ReLU module runs in {type(model).__name__}'s forward, so the "
                         f"{rule!r} rule has nothing to act on and the response would be the "
                         "plain gradient; its rectifiers must be nn.ReLU modules")
    if classes is None:
        out = trace[conv_max_index([m for m, _ in trace])][1]
    objective = out.gather(1, target_indices(out.detach(), classes)).sum()
    (grad,) = torch.autograd.grad(objective, x)
    return grad


@contextmanager
def _trace_relus(model: nn.Module) -> Iterator[list[tuple[nn.Module, torch.Tensor | None]]]:
    """Leaf modules in the order they run, with the outputs of the `ReLURule`s."""
    trace: list[tuple[nn.Module, torch.Tensor | None]] = []

    def record(module, inputs, output):
        trace.append((module, output if isinstance(module, ReLURule) else None))

    handles = [m.register_forward_hook(record) for m in model.modules()
               if next(m.children(), None) is None]
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


class _FunctionalReLUGuard(TorchFunctionMode):
    """Raises on torch.relu / F.relu / Tensor.relu unless an `nn.ReLU` module runs it."""

    def __init__(self, running: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.running = running

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL_RELUS and not (self.running and self.running[-1][1]):
            where = self.running[-1][0] if self.running else "the model"
            raise ValueError(
                f"{where} calls {_FUNCTIONAL_RELUS[func]} in its forward: the ReLU "
                "rules act only at nn.ReLU modules, so this ReLU would back-propagate the plain "
                "gradient. Replace the call with an nn.ReLU module."
            )
        return func(*args, **(kwargs or {}))


def _rectifier(func, args: tuple, kwargs: dict) -> bool:
    """Whether an aten operator call rectifies at zero (a ReLU or a ReLU clipped above)."""
    name = func.overloadpacket.__name__.rstrip("_")
    if name in ("relu", "threshold"):
        return True
    if name not in ("clamp", "clamp_min", "hardtanh"):
        return False
    low = kwargs.get("min", kwargs.get("min_val", args[1] if len(args) > 1 else None))
    if name == "hardtanh" and low is None:
        low = -1.0
    if isinstance(low, torch.Tensor):
        return bool((low == 0).all())
    return low == 0


class _RectifierGuard(TorchDispatchMode):
    """Raises on rectifying operators (see the module docstring) outside `nn.ReLU` modules."""

    def __init__(self, running: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.running = running

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self.running and self.running[-1][1]) and _rectifier(func, args, kwargs):
            where = self.running[-1][0] if self.running else "the model"
            raise ValueError(
                f"{where} runs {func.overloadpacket} (a rectifier) in its forward: the ReLU "
                "rules act only at nn.ReLU modules, so it would back-propagate the plain "
                "gradient. Use an nn.ReLU module instead."
            )
        return func(*args, **kwargs)


@contextmanager
def no_functional_relu(model: nn.Module) -> Iterator[None]:
    """Inside, a rectifier that is not an `nn.ReLU` module anywhere in `model`'s forward raises
    ValueError."""
    running: list[tuple[str, bool]] = []

    def enter(module, args):
        name = names[module]
        label = f"module {name!r} ({type(module).__name__})" if name else \
            f"{type(module).__name__}.forward"
        running.append((label, isinstance(module, (nn.ReLU, ReLURule))))

    def leave(module, args, output):
        running.pop()

    names = {module: name for name, module in model.named_modules()}
    handles = [h for m in names for h in (m.register_forward_pre_hook(enter),
                                          m.register_forward_hook(leave))]
    try:
        with _FunctionalReLUGuard(running), _RectifierGuard(running):
            yield
    finally:
        for h in handles:
            h.remove()
