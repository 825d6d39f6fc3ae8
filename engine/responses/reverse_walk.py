"""The memory-lean reverse walk: feature responses of traced CNNs without autograd.

The walk reads the model's forward pass as ops (`frmap.engine.responses.tracing`): any
composition of convolutions, linear layers, batch norm, ReLUs, pools, reshapes, constant
shifts and scales, residual additions and concatenations, whatever the model's class.

Autograd keeps every activation of the forward pass. The responses need far less: a ReLU rule
needs `f > 0` (1 bit per element, `frmap.kernels.relu_forward`), a max-pool the position of
each window's maximum (a one-byte offset per pooled element, `frmap.kernels.pooling`, where the
stride is the kernel; torch's indices for overlapping windows), and everything else is linear,
so its transpose needs only weights and shapes. The walk runs the ops forward under `no_grad`
keeping just that, freeing each activation after its last use, then walks back:

    conv        R_in = conv_transpose2d(R, W)          (the input gradient of the conv; with
                                                        stride 1, conv2d with W flipped)
    linear      R_in = R @ W
    batch norm  R_in = R * gamma / sqrt(running_var + eps), or folded into the convolution
                whose output it alone reads (one linear map, forward and back)
    max-pool    R_in = R routed to each window's maximum
    ReLU        R_in = the rule, from the mask
    a sum       R to each term, summed where a tensor fans out (a residual block's input)
    constants   R_in = R * c for a product with c, R for a sum with c (the normalisation)
    avg-pool, mean, flatten, view, concatenation: the vector-Jacobian product of the (linear) op

A ReLU whose only user is a max-pool with stride = kernel is walked as the pool followed by the
ReLU: they commute (max(relu(a)) = relu(max(a))), and the first maximum of relu(a) in a window
is that of `a` when the window holds a positive value and its first position otherwise, which
the pool step records. The mask is then 4x smaller and the rule runs at the pooled resolution.
Activations are kept channels-last, which lets oneDNN convolve without reordering copies.

The peak is set by the largest activations, those of the first, high-resolution layers. Images
do not interact, so those ops (the head: up to the last max-pool whose input for the whole batch
exceeds the head budget, where one tensor alone carries the signal on) run depth-first on chunks
of images whose largest activation fits in the budget, forward and back; the rest runs on the
whole batch, whose weights it reuses. On the CPU (`HEAD_BYTES`) the chunks' activations stay in
cache and in reused memory: faster, not just leaner (VGG19's first block on 8 images: 290 ms
whole, 200 ms image by image). On a GPU (`HEAD_BYTES_GPU`) the budget only bounds the peak: its
kernels want many images.

Precision: with `compute_dtype=torch.bfloat16` the convolutions and linear layers, forward and
back, run in bfloat16 on copies of their weights cast once (again only when a weight changes);
their outputs are widened back to the walk's dtype, exactly. Everything else (the ReLU masks,
the max-pool choices, batch norm, the normalisation, the returned responses) is computed from
those values in the walk's dtype, so it is exact given the bfloat16 activations. Measured on a
Zen 4 CPU (AVX512-BF16), per VGG layer: a bfloat16 convolution or transposed convolution with
its weights cast once ran 1.8-2.6x faster than float32.

In float32 the walk and autograd round differently (channels-last convolutions sum in another
order), which can flip a rare ReLU mask or max-pool choice: on a random VGG11 at 224 they differ
by 6e-4 to 1.4e-3 relative L2. In float64 they agree to 1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from frmap.engine.responses.targets import target_indices
from frmap.engine.responses.tracing import (
    Op,
    OpCall,
    Ref,
    TracedModel,
    conv_max_op,
    conv_padding,
    fill,
)
from frmap.kernels import max_pool_offsets, max_unpool_offsets, relu_backward, relu_forward

# Activation size up to which the high-resolution head runs on chunks of images (see above),
# on the CPU and on other devices.
HEAD_BYTES = 16 << 20
HEAD_BYTES_GPU = 256 << 20


class _Step:
    """One op of the walk: `forward` returns the output and what `backward` needs; `backward`
    returns R_in for each of `inputs` (env slots of the op's signal arguments, in order)."""

    signal = True

    def __init__(self, slot: int, inputs: tuple[int, ...]) -> None:
        self.slot, self.inputs = slot, inputs
        self.src = inputs[0] if inputs else 0

    def forward(self, env: list) -> tuple[object, object]:
        raise NotImplementedError

    def backward(self, r: torch.Tensor, saved: object) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """[C, H, W] of one image's output from its (first) input's, None where unknown."""
        return shape


class _Meta(_Step):
    """Not a signal: evaluated as it is (parameters, `x.size(0)`, `mean.to(x)`)."""

    signal = False

    def __init__(self, slot: int, call: OpCall) -> None:
        super().__init__(slot, ())
        self.call = call

    def forward(self, env):
        return self.call(env), None


class _Weights:
    """A layer's weights in the compute dtype: copies made once per weight, and again only
    when the weight changes (its version counter moves: in-place torch ops, `load_state_dict`,
    optimizer steps; not writes through `.data`), or the weights themselves."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self._copies = WeakIdKeyDictionary()

    def __call__(self, w: torch.Tensor | None) -> torch.Tensor | None:
        if w is None or self.dtype is None or w.dtype == self.dtype:
            return w
        stamp = (w._version, w.data_ptr(), w.device)
        copy = self._copies.get(w)
        if copy is None or copy[0] != stamp:
            copy = (stamp, w.detach().to(self.dtype))
            self._copies[w] = copy
        return copy[1]


class _Conv(_Step):
    """Convolution; its transpose is its input gradient.

    A 1x1 convolution (a ResNet's bottlenecks and shortcuts) is a matrix product over the
    channels of each position: run as one, on channels-last activations, where torch's CPU
    convolution would take its slow path and reorder copies. A batch norm that alone reads the
    convolution's output is folded into its weights (`norm`): one linear map, forward and back.
    """

    def __init__(self, slot, inputs, layer: nn.Conv2d, weights: _Weights,
                 back_weights: _Weights, norm: nn.BatchNorm2d | None = None) -> None:
        super().__init__(slot, inputs)
        self.layer, self.padding, self.norm = layer, conv_padding(layer), norm
        self.weights, self.back_weights = weights, back_weights
        self.pointwise = (tuple(layer.kernel_size) == (1, 1) and self.padding == (0, 0)
                          and layer.groups == 1)
        self._fold: tuple | None = None
        self._flip: tuple | None = None
        # with stride 1 (and padding within the kernel's reach), the transpose is a convolution
        # too (`flipped`, padded by `back_padding`; None: conv_transpose2d): faster than
        # conv_transpose2d on oneDNN and on torch's own path (2.3x on a 16-channel 32x32
        # layer of one image, as fast on VGG's layers)
        back = tuple(d * (k - 1) - p for d, k, p in zip(layer.dilation, layer.kernel_size,
                                                         self.padding, strict=True))
        self.back_padding = back if tuple(layer.stride) == (1, 1) and min(back) >= 0 else None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of the convolution followed by `norm` (made again only when one
        of their tensors changes)."""
        c, bn = self.layer, self.norm
        if bn is None:
            return c.weight, c.bias
        parts = (c.weight, c.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        stamp = (*((t._version, t.data_ptr()) for t in parts if t is not None), bn.eps)
        if self._fold is None or self._fold[0] != stamp:
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -bn.running_mean if c.bias is None else c.bias - bn.running_mean
                bias = shift * scale if bn.bias is None else shift * scale + bn.bias
                self._fold = (stamp, c.weight * scale.view(-1, 1, 1, 1), bias)
        return self._fold[1], self._fold[2]

    def flipped(self, w: torch.Tensor) -> torch.Tensor:
        """The weight of the convolution that computes this one's transpose (stride 1): input
        and output channels swapped within each group, the kernel turned by 180 degrees (made
        again only when `w` changes)."""
        stamp = (w._version, w.data_ptr(), w.dtype)
        if self._flip is None or self._flip[0] != stamp:
            g, (out, per_group, kh, kw) = self.layer.groups, w.shape
            t = w.detach().view(g, out // g, per_group, kh, kw).transpose(1, 2)
            self._flip = (stamp, t.reshape(g * per_group, out // g, kh, kw).flip(2, 3)
                          .contiguous())
        return self._flip[1]

    def forward(self, env):
        x = env[self.src]
        c = self.layer
        w, b = self.folded()
        w, b = self.weights(w), self.weights(b)
        if self.pointwise:
            sh, sw = c.stride
            picked = x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]
            y = F.linear(picked.to(w.dtype).permute(0, 2, 3, 1), w.flatten(1),
                         b).permute(0, 3, 1, 2)
            return y.to(x.dtype), x.shape[-2:]
        y = F.conv2d(x.to(w.dtype), w, b, c.stride, self.padding, c.dilation, c.groups)
        return y.to(x.dtype), x.shape[-2:]

    def backward(self, r, in_size):
        c, w = self.layer, self.back_weights(self.folded()[0])
        if self.pointwise:
            g = (r.to(w.dtype).permute(0, 2, 3, 1) @ w.flatten(1)).permute(0, 3, 1, 2)
            if tuple(c.stride) == (1, 1):
                return (g.to(r.dtype),)
            out = torch.empty(len(r), g.shape[1], *in_size, dtype=r.dtype, device=r.device,
                              memory_format=torch.channels_last).zero_()
            out[:, :, ::c.stride[0], ::c.stride[1]] = g
            return (out,)
        if self.back_padding is not None:
            return (F.conv2d(r.to(w.dtype), self.flipped(w), None, 1, self.back_padding,
                             c.dilation, c.groups).to(r.dtype),)
        # conv_transpose2d's output size is ambiguous for strides > 1: output_padding fixes it.
        extra = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                 zip(in_size, r.shape[-2:], c.stride, self.padding, c.dilation, c.kernel_size,
                     strict=True)]
        return (F.conv_transpose2d(r.to(w.dtype), w, stride=c.stride, padding=self.padding,
                                   output_padding=extra, groups=c.groups,
                                   dilation=c.dilation).to(r.dtype),)

    def out_shape(self, shape):
        c = self.layer
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, s, p, d, k in
                zip(shape[-2:], c.stride, self.padding, c.dilation, c.kernel_size, strict=True)]
        return (c.out_channels, *size)


class _BatchNorm(_Step):
    def __init__(self, slot, inputs, layer: nn.BatchNorm2d) -> None:
        super().__init__(slot, inputs)
        self.layer = layer

    def forward(self, env):
        return self.layer(env[self.src]), None

    def backward(self, r, saved):
        layer = self.layer
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = layer.weight * scale
        return (r.mul_(scale.view(1, -1, 1, 1).to(r)),)


class _Linear(_Step):
    def __init__(self, slot, inputs, layer: nn.Linear, weights: _Weights,
                 back_weights: _Weights) -> None:
        super().__init__(slot, inputs)
        self.layer = layer
        self.weights, self.back_weights = weights, back_weights

    def forward(self, env):
        x, w = env[self.src], self.weights(self.layer.weight)
        return F.linear(x.to(w.dtype), w, self.weights(self.layer.bias)).to(x.dtype), None

    def backward(self, r, saved):
        w = self.back_weights(self.layer.weight)
        return ((r.to(w.dtype) @ w).to(r.dtype),)

    def out_shape(self, shape):
        return None


class _ReLU(_Step):
    def __init__(self, slot, inputs, rule: str, inplace: bool) -> None:
        super().__init__(slot, inputs)
        self.rule, self.inplace = rule, inplace

    def forward(self, env):
        return relu_forward(env[self.src], self.rule, inplace=self.inplace)

    def backward(self, r, mask):
        return (relu_backward(r, mask, self.rule, inplace=True),)


class _TorchReLU(_Step):
    """The ReLU rule in torch ops alone (a boolean mask), for a walk that torch.compile takes
    whole and fuses (`ReverseWalk`'s `native`)."""

    def __init__(self, slot, inputs, rule: str) -> None:
        super().__init__(slot, inputs)
        self.rule = rule

    def forward(self, env):
        x = env[self.src]
        return x.clamp_min(0), None if self.rule == "deconvnet" else x > 0

    def backward(self, r, mask):
        if self.rule == "gradient":  # (f > 0) * R
            return (torch.where(mask, r, 0),)
        rectified = r.clamp_min(0)  # deconvnet: (R > 0) * R; guided: (f > 0) * (R > 0) * R
        return (rectified if mask is None else torch.where(mask, rectified, 0),)


class _MaxPool(_Step):
    """Max-pool with stride = kernel; keeps each window's argmax as a one-byte offset.

    With `reuse` (a head step whose unpooled signal goes only into a convolution's transpose),
    the unpooled output of one chunk of images is the buffer of the next: the head's largest
    tensors are then not allocated, and faulted into memory, chunk after chunk.
    """

    def __init__(self, slot, inputs, kernel: tuple[int, int], dead_first: bool) -> None:
        super().__init__(slot, inputs)
        self.kernel, self.dead_first = kernel, dead_first
        self.reuse = False
        self.spare: torch.Tensor | None = None

    def forward(self, env):
        x = env[self.src]
        y, offsets = max_pool_offsets(x, self.kernel, dead_first=self.dead_first)
        return y, (offsets, x.shape[-2:])

    def backward(self, r, saved):
        offsets, size = saved
        spare = self.spare
        out = spare[:len(r)] if spare is not None and len(spare) >= len(r) else None
        out = max_unpool_offsets(r, offsets, self.kernel, size, out=out)
        if self.reuse and spare is None:
            self.spare = out
        return (out,)

    def out_shape(self, shape):
        return (shape[0], shape[1] // self.kernel[0], shape[2] // self.kernel[1])


class _IndexedMaxPool(_Step):
    """Any other max-pool (overlapping windows, padding, dilation): torch's argmax indices,
    the signal summed back into them by torch's own max-pool backward (which reads only the
    shape and layout of the input it is given)."""

    def __init__(self, slot, inputs, params: dict) -> None:
        super().__init__(slot, inputs)
        self.params = params

    def forward(self, env):
        x = env[self.src]
        y, indices = F.max_pool2d(x, **self.params, return_indices=True)
        layout = torch.channels_last if x.ndim == 4 and \
            x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y, (indices, x.shape, layout)

    def backward(self, r, saved):
        indices, shape, layout = saved
        p = self.params
        like = torch.empty(shape, dtype=r.dtype, device=r.device, memory_format=layout)
        return (torch.ops.aten.max_pool2d_with_indices_backward(
            r, like, p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"],
            indices),)

    def out_shape(self, shape):
        p = self.params
        size = [(n + 2 * pad - d * (k - 1) - 1 + (s - 1 if p["ceil_mode"] else 0)) // s + 1
                for n, k, s, pad, d in zip(shape[-2:], p["kernel_size"], p["stride"],
                                           p["padding"], p["dilation"], strict=True)]
        return None if p["ceil_mode"] else (shape[0], *size)


class _Reshape(_Step):
    """flatten / view / reshape: R reshaped back."""

    def __init__(self, slot, inputs, call: OpCall) -> None:
        super().__init__(slot, inputs)
        self.call = call

    def forward(self, env):
        return self.call(env), env[self.src].shape

    def backward(self, r, shape):
        return (r.reshape(shape),)

    def out_shape(self, shape):
        return None


class _LinearMap(_Step):
    """A parameter-free linear op (average pools, means): its vector-Jacobian product."""

    def __init__(self, slot, inputs, call: OpCall) -> None:
        super().__init__(slot, inputs)
        self.call = call

    def forward(self, env):
        x = env[self.src]
        args = fill((self.call.args, self.call.kwargs), env, {self.src: _HOLE})
        return self.call(env), (x.shape, x.dtype, x.device, args)

    def backward(self, r, saved):
        shape, dtype, device, (args, kwargs) = saved
        with torch.enable_grad():
            z = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
            out = self.call.fn(*fill(args, [], {-1: z}), **fill(kwargs, [], {-1: z}))
            (grad,) = torch.autograd.grad(out, z, r)
        return (grad,)

    def out_shape(self, shape):
        return None


_HOLE = Ref(-1)  # where `_LinearMap` puts its input back for the vector-Jacobian product


class _Identity(_Step):
    def forward(self, env):
        return env[self.src], None

    def backward(self, r, saved):
        return (r,)


class _Sum(_Step):
    """A sum or difference of two signals: R to each term (-R to a subtracted one), summed back
    to a term's shape where it was broadcast.

    With `into_first`, a sum is added into its first term (a new tensor only this sum reads).
    With `shared`, both terms get R itself: the later term's step reads R without writing or
    keeping it, and only this sum reads that term, so R is done with before anything writes
    into it; otherwise the second term gets a copy.
    """

    def __init__(self, slot, inputs, call: OpCall, minus: bool, into_first: bool,
                 shared: bool) -> None:
        super().__init__(slot, inputs)
        self.call, self.minus = call, minus
        self.into_first, self.shared = into_first, shared

    def forward(self, env):
        a, b = (env[i] for i in self.inputs)
        if self.into_first and not self.minus and a.shape == b.shape and a.dtype == b.dtype:
            return a.add_(b), (a.shape, b.shape)
        return self.call(env), (a.shape, b.shape)

    def backward(self, r, shapes):
        second = -r if self.minus else r if self.shared else r.clone()
        return tuple(g if g.shape == s else g.sum_to_size(s)
                     for g, s in zip((r, second), shapes, strict=True))


class _Constant(_Step):
    """A signal times, over, plus or minus a constant (`scale` and `shift` ops): R times the
    op's derivative, summed back to the input's shape where it was broadcast."""

    def __init__(self, slot, inputs, call: OpCall,
                 factor: Callable[[list], tuple[object, bool]]) -> None:
        super().__init__(slot, inputs)
        self.call, self.factor = call, factor

    def forward(self, env):
        return self.call(env), (env[self.src].shape, *self.factor(env))

    def backward(self, r, saved):
        shape, factor, divide = saved
        g = r if factor is None else r / factor if divide else r * factor
        return (g if g.shape == shape else g.sum_to_size(shape),)


class _Cat(_Step):
    """Concatenation: R split back to the concatenated tensors (constants' parts dropped)."""

    def __init__(self, slot, inputs, call: OpCall) -> None:
        super().__init__(slot, inputs)
        self.call = call
        tensors = call.args[0] if call.args else call.kwargs["tensors"]
        self.parts = [t.slot if isinstance(t, Ref) else None for t in tensors]
        self.dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)

    def forward(self, env):
        tensors = fill(self.call.args[0] if self.call.args else self.call.kwargs["tensors"],
                        env)
        return self.call(env), [t.shape[self.dim] for t in tensors]

    def backward(self, r, sizes):
        pieces = r.split(sizes, self.dim)
        return tuple(p.contiguous() for p, s in zip(pieces, self.parts, strict=True)
                     if s is not None and s in self.inputs)


def _factor(op: Op, call: OpCall) -> Callable[[list], tuple[object, bool]]:
    """d(out)/d(signal) of a scale or shift op from the walk's values: (c, divide) for R * c
    or R / c, c None for 1."""
    name = getattr(op.node.target, "__name__", op.node.target).strip("_").lstrip("i")
    first_is_signal = isinstance(call.args[0], Ref) and call.args[0].slot == op.inputs[0]
    other = (call.args[1] if first_is_signal else call.args[0]) if len(call.args) > 1 else None
    if name == "neg" or (name == "sub" and not first_is_signal):
        return lambda env: (-1, False)
    if name in ("add", "sub"):
        return lambda env: (None, False)
    divide = name in ("truediv", "div")
    return lambda env: (fill(other, env), divide)


def _pool_params(op: Op) -> dict:
    """kernel_size, stride, padding, dilation and ceil_mode of a max-pool op (literals)."""
    if op.module is not None:
        m = op.module
        raw = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    else:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        defaults = (None, None, 0, 1, False)
        given = dict(zip(names, op.node.args[1:], strict=False)) | {
            k: v for k, v in op.node.kwargs.items() if k in names}
        raw = tuple(given.get(n, d) for n, d in zip(names, defaults, strict=True))
        if any(isinstance(v, fx.Node) for v in raw):
            raise ValueError("max_pool2d's settings must be literals")
    kernel, stride, padding, dilation, ceil_mode = raw
    return {"kernel_size": _pair(kernel), "stride": _pair(stride or kernel),
            "padding": _pair(padding), "dilation": _pair(dilation), "ceil_mode": bool(ceil_mode)}


def _offsets_pool(params: dict) -> bool:
    """Whether the one-byte-offset kernel runs this pool (stride = kernel, no padding)."""
    kh, kw = params["kernel_size"]
    return (params["stride"] == (kh, kw) and kh * kw <= 256 and params["padding"] == (0, 0)
            and params["dilation"] == (1, 1) and not params["ceil_mode"])


# Steps whose walk back reads R without writing into it or returning a view of it.
_READ_ONLY_BACK = (_Conv, _Linear, _MaxPool, _IndexedMaxPool, _LinearMap)



def _reads_only(steps: list[_Step], slot: int, readers: list[list[int]]) -> bool:
    """Whether R at `slot` is only read on its way back: one reader of the slot, and a step
    in `_READ_ONLY_BACK` (through identities, as a folded batch norm) writes it."""
    while isinstance(steps[slot], _Identity) and slot and len(readers[slot]) == 1:
        slot = steps[slot].src
    return len(readers[slot]) == 1 and isinstance(steps[slot], _READ_ONLY_BACK)


# Ops whose output is a new tensor (a ReLU may then rectify it in place).
_FRESH = ("conv", "linear", "batch_norm", "max_pool", "linear_map", "add", "sub", "shift",
          "scale", "cat")


@dataclass
class _Program:
    """Steps in execution order (step i writes slot i) and when each value can be dropped."""

    steps: list[_Step]
    frees: list[tuple[int, ...]]  # after step i, the slots no later step reads
    last: list[int]  # the last step reading each slot (the slot itself when none does)
    users: list[int]  # signal steps reading each slot


def _program(traced: TracedModel, rule: str, weights: _Weights, back_weights: _Weights,
             keep: int | None, native: bool = False) -> _Program:
    """The walk's steps of `traced`; the ReLU at `keep` is never walked after its max-pool (its
    output is the target). `native`: torch ops alone (`_TorchReLU`, `_IndexedMaxPool`), each
    ReLU before its pool."""
    ops, position = traced.ops, {op.node: i for i, op in enumerate(traced.ops)}
    users = [0] * len(ops)
    readers: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        for j in op.inputs:
            users[j] += 1
        for n in op.node.all_input_nodes:
            readers[position[n]].append(i)
    # conv position -> the batch norm that alone reads its output, folded into the conv where
    # the walk computes in the weights' own dtype (in bfloat16 the batch norm stays exact)
    norms = {i: readers[i][0] for i, op in enumerate(ops) if op.kind == "conv"
             and len(readers[i]) == 1 and ops[readers[i][0]].kind == "batch_norm"
             and weights.dtype is None and back_weights.dtype is None}
    normed = {j: i for i, j in norms.items()}
    fused: dict[int, int] = {}  # pool position -> the position of the ReLU walked after it
    for i, op in enumerate(ops):
        if op.kind == "relu" and i != keep and len(readers[i]) == 1 and not native:
            after = readers[i][0]
            if ops[after].kind == "max_pool" and _offsets_pool(_pool_params(ops[after])):
                fused[after] = i
    pool_of_relu = {r: p for p, r in fused.items()}

    def call(op: Op) -> OpCall:
        return OpCall(op, traced.module, position)

    steps: list[_Step] = [_Identity(0, (0,))]
    for i, op in enumerate(ops[1:], 1):
        inputs, kind = op.inputs, op.kind
        if i in pool_of_relu:  # the pool runs here, on the ReLU's input
            kernel = _pool_params(ops[pool_of_relu[i]])["kernel_size"]
            steps.append(_MaxPool(i, inputs, kernel, dead_first=rule == "deconvnet"))
        elif i in fused:  # the ReLU runs here, on the pooled values
            steps.append(_ReLU(i, (fused[i],), rule, inplace=True))
        elif kind == "meta":
            steps.append(_Meta(i, call(op)))
        elif kind == "conv":
            norm = ops[norms[i]].module if i in norms else None
            steps.append(_Conv(i, inputs, op.module, weights, back_weights, norm))
        elif kind == "linear":
            steps.append(_Linear(i, inputs, op.module, weights, back_weights))
        elif i in normed:  # folded into the convolution before it
            steps.append(_Identity(i, inputs))
        elif kind == "batch_norm":
            steps.append(_BatchNorm(i, inputs, op.module))
        elif kind == "relu" and native:
            steps.append(_TorchReLU(i, inputs, rule))
        elif kind == "relu":
            source = inputs[0]
            steps.append(_ReLU(i, inputs, rule, inplace=len(readers[source]) == 1
                               and ops[source].kind in _FRESH))
        elif kind == "max_pool":
            params = _pool_params(op)
            steps.append(_MaxPool(i, inputs, params["kernel_size"], dead_first=False)
                         if _offsets_pool(params) and not native
                         else _IndexedMaxPool(i, inputs, params))
        elif kind == "identity":
            steps.append(_Identity(i, inputs))
        elif kind == "reshape":
            steps.append(_Reshape(i, inputs, call(op)))
        elif kind == "linear_map":
            steps.append(_LinearMap(i, inputs, call(op)))
        elif kind in ("add", "sub"):
            first, later = inputs[0], max(inputs)
            steps.append(_Sum(
                i, inputs, call(op), minus=kind == "sub",
                into_first=len(readers[first]) == 1 and ops[first].kind in _FRESH,
                shared=inputs[0] != inputs[1] and _reads_only(steps, later, readers)))
        elif kind in ("scale", "shift"):
            c = call(op)
            steps.append(_Constant(i, inputs, c, _factor(op, c)))
        else:
            steps.append(_Cat(i, inputs, call(op)))
    last = list(range(len(ops)))
    for slot, rs in enumerate(readers):
        last[slot] = max(rs, default=slot)
    for p, r in fused.items():
        last[r] = p  # the pooled values are read by the ReLU at the pool's position
    frees: list[list[int]] = [[] for _ in ops]
    for slot, i in enumerate(last):
        if i > slot and slot != traced.output:
            frees[i].append(slot)
    return _Program(steps, [tuple(f) for f in frees], last, users)


@dataclass(frozen=True)
class WalkOutput:
    """What one walk gives.

    Attributes:
        responses: [N, C, H, W] the responses of the images.
        logits: [N, K] the model's output (None unless taps were asked for).
        taps: layer name -> [N, C] its output averaged over the spatial positions ([N, D]
            outputs as they are), from the walk's own forward pass.
    """

    responses: torch.Tensor
    logits: torch.Tensor | None = None
    taps: dict[str, torch.Tensor] = field(default_factory=dict)


class ReverseWalk:
    """Responses of a traced model (`frmap.engine.responses.tracing.trace_ops`) by the walk.

    Args:
        traced: the model's ops; its modules in eval mode while used.
        rule: "gradient", "deconvnet" or "guided".
        compute_dtype: the dtype of the convolutions and linear layers (torch.bfloat16), or
            None for the weights' own (see the module text).
        backward_dtype: the same for the walk back alone (default: `compute_dtype`); with
            `compute_dtype` None and bfloat16 here, the forward pass (the logits, the masks, the
            taps) is exact and only the transposed layers run in bfloat16.
        native: torch ops alone (boolean ReLU masks, torch's max-pool indices, each ReLU before
            its pool): the walk that `frmap.engine.responses.compiled_walk` traces and compiles.
    """

    def __init__(self, traced: TracedModel, rule: str,
                 compute_dtype: torch.dtype | None = None,
                 backward_dtype: torch.dtype | None = None, *, native: bool = False) -> None:
        self.traced = traced
        self.rule = rule
        self.weights = weights = _Weights(compute_dtype)
        back_weights = weights if backward_dtype in (None, compute_dtype) \
            else _Weights(backward_dtype)
        self._full = _program(traced, rule, weights, back_weights, None, native)
        try:
            self._conv_max: int | None = conv_max_op(traced.ops)
        except ValueError:
            self._conv_max = None
        self._to_conv_max = None if self._conv_max is None else \
            _program(traced, rule, weights, back_weights, self._conv_max, native)
        calls: dict[str, list[int]] = {}
        for i, op in enumerate(traced.ops):
            if op.module is not None:
                calls.setdefault(op.name, []).append(i)
        # a ReLU walked after its max-pool: its slot holds the pooled values before the ReLU;
        # a convolution with a batch norm folded in: its slot holds the normalised values
        fused = {s.slot for s in self._full.steps
                 if isinstance(s, _MaxPool) and traced.ops[s.slot].kind == "relu"} | {
            s.slot for s in self._full.steps if isinstance(s, _Conv) and s.norm is not None}
        # layer name -> the slot of its output, for layers called once whose output the walk
        # holds
        self._taps = {name: slots[0] for name, slots in calls.items()
                      if len(slots) == 1 and slots[0] not in fused}
        self._heads: dict[tuple, tuple[int, int]] = {}  # `_head` of each batch shape

    def tappable(self, name: str) -> bool:
        """Whether the walk's forward pass holds the output of the layer called `name` (every
        layer called once but a ReLU walked after its max-pool)."""
        return name in self._taps

    def run(self, x: torch.Tensor, classes: torch.Tensor | None,
            taps: Sequence[str] | None = None, *, checked: bool = False) -> WalkOutput:
        """The responses of `x` ([N, C, H, W] images as the model takes them) for `classes`
        ([N] class indices, -1 for the top class, or None for 'conv_max': the sum over positions
        of the channel-wise maximum of the last ReLU after a convolution), and with `taps`
        (layer names, each `tappable`) the logits and the pooled outputs of those layers from
        the same forward pass: the forward pass then runs to the end of the model, past the
        target where it lies before. `checked`: the classes are known to lie in range
        (`target_indices`)."""
        if classes is None:
            if self._conv_max is None:
                raise ValueError("target 'conv_max' needs a ReLU after a convolution; found none")
            program, target = self._to_conv_max, self._conv_max
        else:
            program, target = self._full, self.traced.output
        wanted: dict[int, list[str]] = {}
        for name in taps or ():
            wanted.setdefault(self._taps[name], []).append(name)
        pooled: dict[str, list[torch.Tensor]] = {name: [] for name in taps or ()}
        steps = program.steps[:target + 1]
        head, chunk = self._head(program, target, x)
        for step in steps[:head]:
            if isinstance(step, _MaxPool):
                step.reuse = isinstance(steps[step.src], _Conv) and program.users[step.src] == 1
        size = len(program.steps)
        with torch.no_grad():
            env, head_saved = self._head_forward(program, head, chunk, x, wanted, pooled)
            saved = _forward(program, steps[head:], env, wanted, pooled)
            out = env[target]
            # the derivative of the target (a sum of entries of `out`): 1 at those entries
            r = torch.zeros_like(out).scatter_(
                1, target_indices(out, classes, checked=checked), 1.0)
            logits = None
            if taps is not None:
                _forward(program, program.steps[target + 1:], env, wanted, pooled)
                logits = env[self.traced.output]
            del env, out
            r = _backward(steps[head:], target, r, saved, size, head - 1 if head else 0)
            responses = _cat([_backward(steps[:head], head - 1, part, saved, size, 0)
                              for part, saved in zip(r.split(chunk), head_saved, strict=True)]
                             ) if head else r
        return WalkOutput(responses.contiguous(), logits,
                          {n: _cat(v) for n, v in pooled.items()})

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for `x` from the walk's forward pass alone: the classifier's
        logits, computed by the walk's steps (channels-last, one-byte max-pool offsets)."""
        program = self._full
        head, chunk = self._head(program, self.traced.output, x)
        with torch.no_grad():
            env, _ = self._head_forward(program, head, chunk, x, {}, {})
            _forward(program, program.steps[head:], env, {}, {})
        return env[self.traced.output]

    def _head(self, program: _Program, target: int, x: torch.Tensor) -> tuple[int, int]:
        """`_head` of `program` for a batch like `x`, worked out once per batch shape."""
        key = (id(program), target, tuple(x.shape), x.dtype, x.device.type, HEAD_BYTES,
               HEAD_BYTES_GPU)
        if key not in self._heads:
            self._heads[key] = _head(program, target, x)
        return self._heads[key]

    @staticmethod
    def _head_forward(program: _Program, head: int, chunk: int, x: torch.Tensor,
                      wanted: dict[int, list[str]], pooled: dict[str, list[torch.Tensor]]
                      ) -> tuple[list, list[list[object]]]:
        """The first `head` steps on chunks of `chunk` images of `x` (no grad): the slots for
        the rest, holding the head's output for the whole batch, and what each chunk saved."""
        size = len(program.steps)
        x = x.clone(memory_format=torch.channels_last)  # steps work in place
        parts, head_saved = [], []
        for part in x.split(chunk):
            env = [None] * size
            env[0] = part
            head_saved.append(_forward(program, program.steps[:head], env, wanted, pooled))
            parts.append(env[head - 1] if head else part)
        env = [None] * size
        env[head - 1 if head else 0] = _cat(parts)
        return env, head_saved


def _forward(program: _Program, steps: list[_Step], env: list,
             wanted: dict[int, list[str]], pooled: dict[str, list[torch.Tensor]]
             ) -> list[object]:
    """The steps forward on `env`; the output of a step whose slot is in `wanted` is pooled
    (the mean over spatial positions) into `pooled` for each layer name listed there."""
    saved = []
    frees = program.frees
    for step in steps:
        value, keep = step.forward(env)
        slot = step.slot
        env[slot] = value
        saved.append(keep)
        if wanted and slot in wanted:
            mean = value.flatten(2).mean(2) if value.ndim > 2 else value.clone()
            for name in wanted[slot]:
                pooled[name].append(mean)
        for i in frees[slot]:
            env[i] = None
    return saved


def _backward(steps: list[_Step], start: int, r: torch.Tensor, saved: list[object],
              size: int, end: int) -> torch.Tensor:
    """The steps back from R at slot `start`; R at slot `end` (zeros where nothing reaches)."""
    grads: list[torch.Tensor | None] = [None] * size
    grads[start] = r
    for step, keep in zip(reversed(steps), reversed(saved), strict=True):
        g = grads[step.slot]
        if g is None or not step.signal:
            continue
        if step.slot != end:
            grads[step.slot] = None
            for i, gi in zip(step.inputs, step.backward(g, keep), strict=True):
                grads[i] = gi if grads[i] is None else grads[i].add_(gi)
    if grads[end] is None:
        raise ValueError("the target does not depend on the images")
    return grads[end]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _head(program: _Program, target: int, x: torch.Tensor) -> tuple[int, int]:
    """The number of head steps and the images per chunk they run on (see the module text).

    The head is the shortest run of first steps that holds every activation larger, for the
    whole batch, than the budget (`HEAD_BYTES` on the CPU, else `HEAD_BYTES_GPU`) and after
    which one value alone is read (a cut of the graph: after a max-pool and the ReLU walked
    after it, a residual block's output); a chunk holds as many images as keep the head's
    largest activation within it. No head: (0, len(x)).
    """
    steps = program.steps[:target + 1]
    budget = HEAD_BYTES if x.device.type == "cpu" else HEAD_BYTES_GPU
    per_image = budget // (len(x) * x.element_size())  # elements of one image's over-budget size
    shapes: list[tuple[int, ...] | None] = [tuple(x.shape[1:])]  # one image's, per slot
    big = -1  # the last step reading or writing an over-budget activation
    for i, step in enumerate(steps[1:], 1):
        shape = shapes[step.src] if step.signal else None
        shapes.append(None if shape is None else step.out_shape(shape))
        if shape is None:
            if step.signal:
                break
            continue
        if math.prod(shape) > per_image or (shapes[i] and math.prod(shapes[i]) > per_image):
            big = i
    if big < 0 or big + 1 >= len(shapes):
        return 0, len(x)
    reach = list(accumulate(program.last, max))  # the last step reading any slot up to i
    end = next((e for e in range(big + 1, len(shapes)) if reach[e - 2] < e
                and shapes[e - 1] is not None), None)
    if end is None:
        return 0, len(x)
    if end < len(steps) and isinstance(steps[end], _ReLU) and steps[end].src == end - 1 \
            and reach[end - 1] <= end:  # the ReLU walked after the head's last max-pool
        end += 1
    largest = max(math.prod(s) for s in shapes[:end] if s is not None)
    chunk = max(1, budget // (largest * x.element_size()))
    return (end, chunk) if chunk < len(x) and end < len(steps) else (0, len(x))
