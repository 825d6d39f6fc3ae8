"""What the reverse walk reads of a model: its forward pass, traced by torch.fx into ops.

`trace_ops(net)` records `net`'s forward with `torch.fx` symbolic tracing (torch.nn layers and
`ReLURule` as leaves, so any composition of them is read, whatever the model's class) and
classifies each node of the graph:

- a *signal* op depends on the images' values: a layer the walk knows how to go back through
  (see `KINDS`), or the model is refused;
- any other node (parameters and buffers, `x.size(0)`, `mean.to(x)`, ...) is *meta*: it is
  evaluated as it is, forward only.

Refused (`Untraceable`, whose message names the op and the line of the model that runs it): a
forward torch.fx cannot trace (data-dependent control flow), a signal op outside `KINDS` (an
activation other than the ReLU, a product of two signals, a functional convolution, ...), a
rectifier clipped above (ReLU6, hardtanh, `clamp(0, t)`), dropout in training mode, several
outputs.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from frmap.kernels import ReLURule

# The kinds of signal op, and how the walk goes back through each:
#   conv, linear        the transposed layer (conv_transpose2d, R @ W)
#   batch_norm          R * gamma / sqrt(var + eps) (eval mode)
#   relu                the rule, from the forward's mask
#   max_pool            R routed to each window's maximum
#   reshape             R reshaped to the input's shape (flatten, view, reshape)
#   linear_map          the vector-Jacobian product of a parameter-free linear op (average
#                       pools, means over dimensions)
#   identity            R (dropout in eval mode, nn.Identity, contiguous)
#   add, sub            R to each term (-R to a subtracted one): residual connections
#   shift               R (adding or subtracting a constant)
#   scale               R * c or R / c (multiplying or dividing by a constant)
#   cat                 R split back to the concatenated tensors
KINDS = ("conv", "linear", "batch_norm", "relu", "max_pool", "reshape", "linear_map",
         "identity", "add", "sub", "shift", "scale", "cat")

_MODULE_KINDS = ((nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm2d, "batch_norm"),
                 (ReLURule, "relu"), (nn.ReLU, "relu"), (nn.MaxPool2d, "max_pool"),
                 (nn.Flatten, "reshape"), (nn.AvgPool2d, "linear_map"),
                 (nn.AdaptiveAvgPool2d, "linear_map"), (nn.Identity, "identity"),
                 (nn.Dropout, "identity"), (nn.Dropout2d, "identity"))
_FUNCTION_KINDS = {F.relu: "relu", torch.relu: "relu", torch.flatten: "reshape",
                   torch.reshape: "reshape", F.adaptive_avg_pool2d: "linear_map",
                   F.avg_pool2d: "linear_map", torch.mean: "linear_map",
                   F.max_pool2d: "max_pool", F.dropout: "identity", torch.cat: "cat",
                   operator.add: "add", torch.add: "add", operator.iadd: "add",
                   operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
                   operator.mul: "scale", torch.mul: "scale", operator.imul: "scale",
                   operator.truediv: "scale", torch.div: "scale", operator.itruediv: "scale",
                   operator.neg: "scale", torch.neg: "scale", torch.clamp: "relu",
                   torch.clamp_min: "relu"}
_METHOD_KINDS = {"relu": "relu", "relu_": "relu", "flatten": "reshape", "view": "reshape",
                 "reshape": "reshape", "mean": "linear_map", "contiguous": "identity",
                 "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "scale",
                 "mul_": "scale", "div": "scale", "div_": "scale", "neg": "scale",
                 "clamp": "relu", "clamp_": "relu", "clamp_min": "relu", "clamp_min_": "relu"}
# Methods whose result depends on a signal's metadata (shape, dtype, device) only.
_META_METHODS = {"size", "dim", "to", "type_as", "new_zeros", "new_ones", "new_empty"}
_META_ATTRS = {"shape", "dtype", "device", "ndim"}


class Untraceable(ValueError):
    """The walk cannot read the model; the message is the one-line reason."""


@dataclass(frozen=True)
class Op:
    """One node of the traced forward pass.

    Attributes:
        node: the fx node.
        kind: one of `KINDS`, or "meta" (not a signal: evaluated as it is, forward only).
        inputs: positions (in the op list) of its signal inputs, in argument order; the images
            are position 0 (the placeholder).
        module: the layer it calls (call_module nodes), else None.
    """

    node: fx.Node
    kind: str
    inputs: tuple[int, ...]
    module: nn.Module | None = None

    @property
    def name(self) -> str:
        """The module's qualified name for a layer, else the node's name."""
        return str(self.node.target) if self.node.op == "call_module" else self.node.name


class _Tracer(fx.Tracer):
    """torch.nn layers and `ReLURule` are leaves; the rest is traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ReLURule) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class TracedModel:
    """`net`'s forward as ops in execution order (position 0: the images), and the position of
    its output; the ops' targets are names in `module` (the traced model)."""

    module: nn.Module
    ops: list[Op]
    output: int


def trace_ops(net: nn.Module) -> TracedModel:
    """`net`'s forward pass as ops (see the module text).

    Raises:
        Untraceable: naming what the walk cannot read and where.
    """
    training = [m for m in net.modules() if m.training]
    for m in training:
        m.training = False  # dropout and batch norm are traced as they run: in eval mode
    try:
        graph = _Tracer().trace(net)
    except Exception as err:  # torch.fx raises many kinds: all mean "cannot trace"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Untraceable(f"torch.fx cannot trace {type(net).__name__}'s forward: {first}"
                          ) from None
    finally:
        for m in training:
            m.training = True
    modules = dict(net.named_modules())
    position: dict[fx.Node, int] = {}
    signal: set[fx.Node] = set()
    ops: list[Op] = []
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if ops:
                raise Untraceable(f"{type(net).__name__}'s forward takes more than the images")
            signal.add(node)
            position[node] = 0
            ops.append(Op(node, "input", ()))
            continue
        if node.op == "output":
            (out,) = node.args
            if not isinstance(out, fx.Node) or out not in signal:
                raise Untraceable(f"{type(net).__name__}'s forward must return one tensor of "
                                  "the images")
            output = position[out]
            continue
        inputs = _signal_args(node, signal, position)
        if not inputs or _meta_only(node, signal):
            kind, inputs = "meta", ()
        else:
            kind = _kind(node, modules, signal, len(inputs))
            signal.add(node)
        position[node] = len(ops)
        ops.append(Op(node, kind, inputs,
                      modules.get(node.target) if node.op == "call_module" else None))
    return TracedModel(net, ops, output)


def _signal_args(node: fx.Node, signal: set[fx.Node], position: dict[fx.Node, int]
                 ) -> tuple[int, ...]:
    """Positions of the node's signal arguments, in order (a list argument, as torch.cat's,
    flattened), repeats kept."""
    found: list[int] = []
    fx.node.map_arg((node.args, node.kwargs),
                    lambda n: found.append(position[n]) if n in signal else None)
    return tuple(found)


def _meta_only(node: fx.Node, signal: set[fx.Node]) -> bool:
    """Whether the node uses its signal inputs' metadata only (`x.size(0)`, `c.to(x)`)."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return node.target in ("size", "dim") or node.args[0] not in signal
    return node.op == "call_function" and node.target is getattr and \
        node.args[1] in _META_ATTRS


def _where(node: fx.Node) -> str:
    """The model's source line that runs `node`, when torch.fx recorded it."""
    lines = (node.stack_trace or "").strip().splitlines()
    # frames are "File ..., line N, in f" then the line's code; torch's own frames come last
    code = [lines[i + 1].strip() for i in range(0, len(lines) - 1, 2)
            if lines[i].strip().startswith("File") and f"{os.sep}torch{os.sep}" not in lines[i]]
    return f" ({code[-1]})" if code else ""


def _kind(node: fx.Node, modules: dict[str, nn.Module], signal: set[fx.Node],
          signals: int) -> str:
    """The kind of a signal node with `signals` signal arguments (repeats counted), or
    Untraceable naming it."""
    if node.op == "call_module":
        module = modules[node.target]
        cls, kind = next(((c, k) for c, k in _MODULE_KINDS if isinstance(module, c)),
                         (None, None))
        what = f"{type(module).__name__} module {node.target!r}"
        # a subclass with a forward of its own may do more (a hidden rectifier)
        if kind is None or type(module).forward is not cls.forward:
            raise Untraceable(f"the reverse walk does not support the {what}")
        _check_module(module, what)
        return kind
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target)
        what = f"{getattr(node.target, '__name__', node.target)} at {node.name!r}{_where(node)}"
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(node.target)
        what = f"Tensor.{node.target} at {node.name!r}{_where(node)}"
    else:
        kind, what = None, f"{node.op} {node.target!r}"
    if kind is None:
        raise Untraceable(f"the reverse walk does not support {what}")
    if kind == "relu" and node.target in (torch.clamp, torch.clamp_min, "clamp", "clamp_",
                                          "clamp_min", "clamp_min_"):
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        high = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
        if low != 0 or high is not None:
            raise Untraceable(f"the reverse walk supports clamp only as a ReLU (min=0, no max), "
                              f"not {what}")
    if kind == "scale" and node.target in (operator.truediv, torch.div, operator.itruediv,
                                           "div", "div_") and node.args[1] in signal:
        raise Untraceable(f"the reverse walk does not support dividing by a signal: {what}")
    if kind == "scale" and signals > 1:
        raise Untraceable(f"the reverse walk does not support a product of two signals: {what}")
    if kind in ("add", "sub") and (node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2):
        raise Untraceable(f"the reverse walk does not support add/sub with alpha: {what}")
    if kind in ("add", "sub") and signals == 1:
        return "shift"
    if kind == "identity" and node.target is F.dropout and \
            node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
        raise Untraceable(f"dropout in training mode is not a fixed layer: {what}")
    if kind == "max_pool":
        _check_pool(node.kwargs.get("return_indices", False), what)
    return kind


def _check_module(module: nn.Module, what: str) -> None:
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros"
                                          or conv_padding(module) is None):
        raise Untraceable(f"the reverse walk needs zero padding of a fixed size: {what}")
    if isinstance(module, nn.BatchNorm2d) and module.running_var is None:
        raise Untraceable(f"the reverse walk needs batch norm's running statistics: {what}")
    if isinstance(module, nn.MaxPool2d):
        _check_pool(module.return_indices, what)


def _check_pool(return_indices: bool, what: str) -> None:
    if return_indices:
        raise Untraceable(f"the reverse walk does not support max-pool indices as an output: "
                          f"{what}")


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The convolution's padding as two numbers ("same" resolved), None where it is not
    symmetric."""
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)


class Ref:
    """An argument taken from the walk's values at run time: the output of op `slot`."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


def fill(template: object, env: list, swap: dict[int, object] | None = None) -> object:
    """`template` with each `Ref` replaced by its value (or by `swap[slot]`)."""
    if isinstance(template, Ref):
        return swap[template.slot] if swap and template.slot in swap else env[template.slot]
    if isinstance(template, (tuple, list)):
        return type(template)(fill(t, env, swap) for t in template)
    if isinstance(template, dict):
        return {k: fill(v, env, swap) for k, v in template.items()}
    return template


# In-place operators and their out-of-place twins: the walk's values may have other readers.
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv}


class OpCall:
    """An fx node's computation on the walk's values (never in place)."""

    def __init__(self, op: Op, module: nn.Module, position: dict[fx.Node, int]) -> None:
        node = op.node
        self.args, self.kwargs = fx.node.map_arg((node.args, node.kwargs),
                                                 lambda n: Ref(position[n]))
        self.kwargs = {k: v for k, v in self.kwargs.items() if k != "inplace"}
        if node.op == "call_module":
            self.fn = module.get_submodule(node.target)
        elif node.op == "call_method":
            name = node.target.rstrip("_") if node.target.endswith("_") and \
                not node.target.startswith("_") else node.target
            # the walk keeps activations channels-last, where a view may not exist
            name = "reshape" if name == "view" else name
            self.fn = lambda x, *a, **k: getattr(x, name)(*a, **k)
        elif node.op == "get_attr":
            self.fn = lambda: operator.attrgetter(node.target)(module)
        else:
            self.fn = _OUT_OF_PLACE.get(node.target, node.target)

    def __call__(self, env: list, swap: dict[int, object] | None = None) -> object:
        return self.fn(*fill(self.args, env, swap), **fill(self.kwargs, env, swap))


def conv_max_op(ops: Sequence[Op]) -> int:
    """Position of the last ReLU whose nearest preceding conv or linear op is a convolution.

    Raises:
        ValueError: no ReLU follows a convolution.
    """
    found, last = None, None
    for i, op in enumerate(ops):
        if op.kind in ("conv", "linear"):
            last = op.kind
        elif op.kind == "relu" and last == "conv":
            found = i
    if found is None:
        raise ValueError("target 'conv_max' needs a ReLU after a convolution; found none")
    return found
