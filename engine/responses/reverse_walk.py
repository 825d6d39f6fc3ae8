"""The memory-lean reverse walk: feature responses of sequential CNNs without autograd.

Autograd keeps every activation of the forward pass. The responses need far less: a ReLU rule
needs `f > 0` (1 bit per element, `frmap.kernels.relu_forward`), a max-pool the position of
each window's maximum (a one-byte offset per pooled element, `frmap.kernels.pooling`), and
convolutions, linear layers, batch norm and average pools are linear, so their transposes need
only weights and shapes. The walk runs the layers forward under `no_grad` keeping just that,
then walks back:

    conv        R_in = conv_transpose2d(R, W)          (the input gradient of the conv)
    linear      R_in = R @ W
    batch norm  R_in = R * gamma / sqrt(running_var + eps)
    max-pool    R_in = R unpooled to each window's maximum (its recorded offset)
    ReLU        R_in = the rule, from the mask
    avg-pool, flatten: the vector-Jacobian product of the (linear) layer
    normalisation      R_in = R / std

A ReLU followed by a max-pool is walked as the pool followed by the ReLU: they commute
(max(relu(a)) = relu(max(a))), and the first maximum of relu(a) in a window is that of `a`
when the window holds a positive value and its first position otherwise, which the pool step
records. The mask is then 4x smaller and the rule runs at the pooled resolution. Activations
are kept channels-last, which lets oneDNN convolve without reordering copies.

The peak is set by the largest activations, those of the first, high-resolution layers. Images
do not interact, so those layers (the head: up to the last max-pool whose input for the whole
batch exceeds the head budget) run depth-first on chunks of images whose largest activation
fits in the budget, forward and back; the rest runs on the whole batch, whose weights it
reuses. On the CPU (`HEAD_BYTES`) the chunks' activations stay in cache and in reused memory:
faster, not just leaner (VGG19's first block on 8 images: 290 ms whole, 200 ms image by image).
On a GPU (`HEAD_BYTES_GPU`) the budget only bounds the peak: its kernels want many images.

Precision: with `compute_dtype=torch.bfloat16` the convolutions and linear layers, forward and
back, run in bfloat16 on copies of their weights cast once (again only when a weight changes);
their outputs are widened back to the walk's dtype, exactly. Everything else (the ReLU masks,
the max-pool choices, batch norm, the normalisation, the returned responses) is computed from
those values in the walk's dtype, so it is exact given the bfloat16 activations. Measured on a
Zen 4 CPU (AVX512-BF16), per VGG layer: a bfloat16 convolution or transposed convolution with
its weights cast once ran 1.8-2.6x faster than float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from frmap.engine.models.digits import DigitsCNN
from frmap.engine.models.vgg import Normalized
from frmap.engine.responses.targets import conv_max_index, target_indices
from frmap.kernels import (
    ReLURule,
    max_pool_offsets,
    max_unpool_offsets,
    relu_backward,
    relu_forward,
)

# Parameter-free linear layers walked back by their vector-Jacobian product.
_LINEAR_MAPS = (nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# Layers that are the identity in eval mode.
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout2d)
# Activation size up to which the high-resolution head runs on chunks of images (see above),
# on the CPU and on other devices.
HEAD_BYTES = 16 << 20
HEAD_BYTES_GPU = 256 << 20


# Modules laid out as `features`, an optional `avgpool` and `classifier` whose forward is known
# to be classifier(flatten(avgpool(features(x)))).
_CHAIN_FORWARDS = (torchvision.models.VGG.forward, DigitsCNN.forward)


def sequential_layers(net: nn.Module) -> list[nn.Module] | None:
    """The leaf layers `net` chains, or None when it is not a chain the walk can follow.

    Chains, decided from the model's structure alone: `nn.Sequential` (and subclasses that keep
    its forward), `Normalized` around a chain, and torchvision's VGG and `DigitsCNN` (made of
    `features`, an optional `avgpool` and `classifier`, with the forward of their own class).
    Any other module is not a chain, whatever its layers: its forward may do more.
    """
    if isinstance(net, Normalized):
        inner = sequential_layers(net.model)
        return None if inner is None else [net, *inner]
    if isinstance(net, nn.Sequential) and type(net).forward is nn.Sequential.forward:
        parts = [sequential_layers(child) for child in net]
        return None if any(p is None for p in parts) else [m for p in parts for m in p]
    children = dict(net.named_children())
    if not children:
        return [net] if _supported(net) else None
    if type(net).forward in _CHAIN_FORWARDS:
        chain = [children["features"], children.get("avgpool"), nn.Flatten(),
                 children["classifier"]]
        return sequential_layers(nn.Sequential(*(m for m in chain if m is not None)))
    return None


def _supported(layer: nn.Module) -> bool:
    kind = next((k for k in _WALKED if isinstance(layer, k)), None)
    if kind is None or type(layer).forward is not kind.forward:
        return False  # a subclass with a forward of its own may do more (a hidden rectifier)
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    if isinstance(layer, nn.MaxPool2d):
        kh, kw = _pair(layer.kernel_size)
        return ((kh, kw) == _pair(layer.stride) and kh * kw <= 256
                and _pair(layer.padding) == (0, 0) and _pair(layer.dilation) == (1, 1)
                and not layer.ceil_mode
                and not layer.return_indices)
    if isinstance(layer, nn.BatchNorm2d):
        return layer.running_var is not None
    return True


# The layer classes the walk follows (subclasses only where they keep the class's forward).
_WALKED = (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU, ReLURule, nn.Linear, *_LINEAR_MAPS,
           *_IDENTITIES)


class _Step:
    """One layer of the walk: `forward` returns the output and what `backward` needs."""

    end: int | None = None

    def at(self, end: int | None) -> _Step:
        """The step, recording `end` (see `_steps`)."""
        self.end = end
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def backward(self, r: torch.Tensor, saved: object) -> torch.Tensor:
        raise NotImplementedError

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """[C, H, W] of one image's output from its input's, None where the head must end."""
        return shape


class _Normalize(_Step):
    def __init__(self, layer: Normalized) -> None:
        self.layer = layer

    def forward(self, x):
        return self.layer.normalize(x), None

    def backward(self, r, saved):
        return r / self.layer.std.to(r)


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
    """Convolution; its transpose is its input gradient."""

    def __init__(self, layer: nn.Conv2d, weights: _Weights, back_weights: _Weights) -> None:
        self.layer = layer
        self.weights, self.back_weights = weights, back_weights

    def forward(self, x):
        c, w = self.layer, self.weights(self.layer.weight)
        y = F.conv2d(x.to(w.dtype), w, self.weights(c.bias), c.stride, c.padding, c.dilation,
                     c.groups)
        return y.to(x.dtype), x.shape[-2:]

    def backward(self, r, in_size):
        c, w = self.layer, self.back_weights(self.layer.weight)
        # conv_transpose2d's output size is ambiguous for strides > 1: output_padding fixes it.
        extra = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                 zip(in_size, r.shape[-2:], c.stride, c.padding, c.dilation, c.kernel_size,
                     strict=True)]
        return F.conv_transpose2d(r.to(w.dtype), w, stride=c.stride, padding=c.padding,
                                  output_padding=extra, groups=c.groups,
                                  dilation=c.dilation).to(r.dtype)

    def out_shape(self, shape):
        c = self.layer
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, s, p, d, k in
                zip(shape[-2:], c.stride, c.padding, c.dilation, c.kernel_size, strict=True)]
        return (c.out_channels, *size)


class _BatchNorm(_Step):
    def __init__(self, layer: nn.BatchNorm2d) -> None:
        scale = torch.rsqrt(layer.running_var + layer.eps)
        self.layer = layer
        self.scale = (scale if layer.weight is None else layer.weight * scale).view(1, -1, 1, 1)

    def forward(self, x):
        return self.layer(x), None

    def backward(self, r, saved):
        return r.mul_(self.scale.to(r))


class _Linear(_Step):
    def __init__(self, layer: nn.Linear, weights: _Weights, back_weights: _Weights) -> None:
        self.layer = layer
        self.weights, self.back_weights = weights, back_weights

    def forward(self, x):
        w = self.weights(self.layer.weight)
        return F.linear(x.to(w.dtype), w, self.weights(self.layer.bias)).to(x.dtype), None

    def backward(self, r, saved):
        w = self.back_weights(self.layer.weight)
        return (r.to(w.dtype) @ w).to(r.dtype)

    def out_shape(self, shape):
        return None


class _LinearMap(_Step):
    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def forward(self, x):
        return self.layer(x), (x.shape, x.dtype, x.device)

    def backward(self, r, saved):
        shape, dtype, device = saved
        with torch.enable_grad():
            z = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
            (grad,) = torch.autograd.grad(self.layer(z), z, r)
        return grad

    def out_shape(self, shape):
        return None


class _ReLU(_Step):
    def __init__(self, rule: str) -> None:
        self.rule = rule

    def forward(self, x):
        return relu_forward(x, self.rule, inplace=True)

    def backward(self, r, mask):
        return relu_backward(r, mask, self.rule, inplace=True)


class _MaxPool(_Step):
    """Max-pool with stride = kernel; keeps each window's argmax as a one-byte offset.

    With `reuse` (a head step whose unpooled signal goes only into a convolution's transpose),
    the unpooled output of one chunk of images is the buffer of the next: the head's largest
    tensors are then not allocated, and faulted into memory, chunk after chunk.
    """

    def __init__(self, layer: nn.MaxPool2d, dead_first: bool) -> None:
        self.kernel = _pair(layer.kernel_size)
        self.dead_first = dead_first
        self.reuse = False
        self.spare: torch.Tensor | None = None

    def forward(self, x):
        y, offsets = max_pool_offsets(x, self.kernel, dead_first=self.dead_first)
        return y, (offsets, x.shape[-2:])

    def backward(self, r, saved):
        offsets, size = saved
        spare = self.spare
        out = spare[:len(r)] if spare is not None and len(spare) >= len(r) else None
        out = max_unpool_offsets(r, offsets, self.kernel, size, out=out)
        if self.reuse and spare is None:
            self.spare = out
        return out

    def out_shape(self, shape):
        return (shape[0], shape[1] // self.kernel[0], shape[2] // self.kernel[1])


def _steps(layers: Sequence[nn.Module], rule: str, weights: _Weights | None = None,
           back_weights: _Weights | None = None, start: int = 0) -> list[_Step]:
    """The walk's steps of `layers`, the convolutions and linear layers forward on `weights`
    and back on `back_weights` (default: the same); each step's `end` is `start` + the index in
    `layers` of the layer whose output it returns (None for the max-pool of a fused ReLU and
    max-pool: its output, before the ReLU, is no layer's)."""
    weights = _Weights(None) if weights is None else weights
    back_weights = weights if back_weights is None else back_weights
    steps: list[_Step] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, _IDENTITIES):
            i += 1
            continue
        following = next((m for m in layers[i + 1:] if not isinstance(m, _IDENTITIES)), None)
        if isinstance(layer, (nn.ReLU, ReLURule)) and isinstance(following, nn.MaxPool2d):
            # deconvnet passes signal through windows without a positive value: route it as
            # max_pool2d would after the ReLU; the other rules stop it at the pooled ReLU.
            pool = layers.index(following, i + 1)
            steps += [_MaxPool(following, dead_first=rule == "deconvnet").at(None),
                      _ReLU(rule).at(start + pool)]
            i = pool + 1
            continue
        if isinstance(layer, (nn.ReLU, ReLURule)):
            step = _ReLU(rule)
        elif isinstance(layer, nn.MaxPool2d):
            step = _MaxPool(layer, dead_first=False)
        elif isinstance(layer, Normalized):
            step = _Normalize(layer)
        elif isinstance(layer, nn.Conv2d):
            step = _Conv(layer, weights, back_weights)
        elif isinstance(layer, nn.BatchNorm2d):
            step = _BatchNorm(layer)
        elif isinstance(layer, nn.Linear):
            step = _Linear(layer, weights, back_weights)
        else:
            step = _LinearMap(layer)
        steps.append(step.at(start + i))
        i += 1
    return steps


@dataclass(frozen=True)
class WalkOutput:
    """What one walk gives.

    Attributes:
        responses: [N, C, H, W] the responses of the images.
        logits: [N, K] the chain's output (None unless taps were asked for).
        taps: layer index -> [N, C] its output averaged over the spatial positions ([N, D]
            outputs as they are), from the walk's own forward pass.
    """

    responses: torch.Tensor
    logits: torch.Tensor | None = None
    taps: dict[int, torch.Tensor] = field(default_factory=dict)


class ReverseWalk:
    """Responses of a chain of layers (see `sequential_layers`) by the reverse walk.

    Args:
        layers: the chain, as `sequential_layers` returns it; modules in eval mode while used.
        rule: "gradient", "deconvnet" or "guided".
        compute_dtype: the dtype of the convolutions and linear layers (torch.bfloat16), or
            None for the weights' own (see the module text).
        backward_dtype: the same for the walk back alone (default: `compute_dtype`); with
            `compute_dtype` None and bfloat16 here, the forward pass (the logits, the masks, the
            taps) is exact and only the transposed layers run in bfloat16.
    """

    def __init__(self, layers: Sequence[nn.Module], rule: str,
                 compute_dtype: torch.dtype | None = None,
                 backward_dtype: torch.dtype | None = None) -> None:
        self.layers = list(layers)
        self.rule = rule
        self.weights = _Weights(compute_dtype)
        self.back_weights = self.weights if backward_dtype in (None, compute_dtype) \
            else _Weights(backward_dtype)
        ends = {step.end for step in _steps(self.layers, rule)}
        # layer index -> the layer whose step's output is its output
        self._tap_source: dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            if i in ends:
                self._tap_source[i] = i
            elif isinstance(layer, _IDENTITIES) and i - 1 in self._tap_source:
                self._tap_source[i] = self._tap_source[i - 1]

    def tappable(self, index: int) -> bool:
        """Whether the walk's forward pass holds the output of layer `index` (every layer's but
        that of a ReLU walked after its max-pool, and of identities after one)."""
        return index in self._tap_source

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The chain's output (what the model returns), through the walk's own forward."""
        with torch.no_grad():
            x = x.clone(memory_format=torch.channels_last)  # steps work in place
            return self._forward(self._steps(self.layers), x)[0]

    def responses(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """[N, C, H, W] responses of the images `x` (as the chain takes them).

        Args:
            x: [N, C, H, W] float images.
            classes: [N] class indices to back-propagate (-1: the top class), or None for
                'conv_max' (the sum over positions of the channel-wise maximum of the last ReLU
                after a convolution).
        """
        return self.run(x, classes).responses

    def run(self, x: torch.Tensor, classes: torch.Tensor | None,
            taps: Sequence[int] | None = None) -> WalkOutput:
        """`responses`, and with `taps` (layer indices, each `tappable`) the logits and the
        pooled outputs of those layers from the same forward pass: the forward pass then runs
        to the end of the chain, past the target where it lies before."""
        end = conv_max_index(self.layers) + 1 if classes is None else len(self.layers)
        steps = self._steps(self.layers[:end])
        wanted: dict[int, list[int]] = {}
        for i in taps or ():
            wanted.setdefault(self._tap_source[i], []).append(i)
        pooled: dict[int, list[torch.Tensor]] = {i: [] for i in taps or ()}
        head, chunk = _head(steps, x)
        for before, step in zip(steps[:head], steps[1:head], strict=False):
            if isinstance(step, _MaxPool):
                step.reuse = isinstance(before, _Conv)
        with torch.no_grad():
            x = x.clone(memory_format=torch.channels_last)  # steps work in place
            parts, head_saved = [], []
            for part in x.split(chunk):
                out, saved = self._forward(steps[:head], part, wanted, pooled)
                parts.append(out)
                head_saved.append(saved)
            out, saved = self._forward(steps[head:], _cat(parts), wanted, pooled)
            del parts
            # the derivative of the target (a sum of entries of `out`): 1 at those entries
            r = torch.zeros_like(out).scatter_(1, target_indices(out, classes), 1.0)
            logits = None
            if taps is not None:
                tail = self._steps(self.layers[end:], end)
                logits = self._forward(tail, out, wanted, pooled)[0] if tail else out
            del out
            r = self._backward(steps[head:], r, saved)
            responses = _cat([self._backward(steps[:head], part, saved)
                              for part, saved in zip(r.split(chunk), head_saved, strict=True)
                              ]).contiguous()
        return WalkOutput(responses, logits, {i: _cat(v) for i, v in pooled.items()})

    def _steps(self, layers: Sequence[nn.Module], start: int = 0) -> list[_Step]:
        return _steps(layers, self.rule, self.weights, self.back_weights, start)

    @staticmethod
    def _forward(steps: list[_Step], x: torch.Tensor, wanted: dict[int, list[int]] | None = None,
                 pooled: dict[int, list[torch.Tensor]] | None = None
                 ) -> tuple[torch.Tensor, list[object]]:
        """The steps forward; the output of a step whose `end` is in `wanted` is pooled (the
        mean over spatial positions) into `pooled` for each layer index listed there."""
        saved = []
        for step in steps:
            x, keep = step.forward(x)
            saved.append(keep)
            if wanted and step.end in wanted:
                mean = x.flatten(2).mean(2) if x.ndim > 2 else x.clone()
                for i in wanted[step.end]:
                    pooled[i].append(mean)
        return x, saved

    @staticmethod
    def _backward(steps: list[_Step], r: torch.Tensor, saved: list[object]) -> torch.Tensor:
        for step in reversed(steps):
            r = step.backward(r, saved.pop())
        return r


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _head(steps: list[_Step], x: torch.Tensor) -> tuple[int, int]:
    """The number of head steps and the images per chunk they run on (see the module text).

    The head ends after the last max-pool (and the ReLU walked after it) whose input for the
    whole batch exceeds the budget (`HEAD_BYTES` on the CPU, else `HEAD_BYTES_GPU`); a chunk
    holds as many images as keep the head's largest activation within it. No head: (0, len(x)).
    """
    budget = HEAD_BYTES if x.device.type == "cpu" else HEAD_BYTES_GPU
    shape, head = tuple(x.shape[1:]), 0
    sizes = [math.prod(shape)]  # elements per image: sizes[i] enters step i, sizes[i + 1] leaves
    for i, step in enumerate(steps):
        if isinstance(step, _MaxPool) and sizes[i] * len(x) * x.element_size() > budget:
            head = i + 2 if i + 1 < len(steps) and isinstance(steps[i + 1], _ReLU) else i + 1
        shape = step.out_shape(shape)
        if shape is None:
            break
        sizes.append(math.prod(shape))
    chunk = max(1, budget // (max(sizes[:head + 1]) * x.element_size()))
    return (head, chunk) if head and chunk < len(x) else (0, len(x))
