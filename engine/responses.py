"""Feature responses of images and their entropy scores: `ResponseEngine`.

A response is what a ReLU rule (`frmap.kernels.RULES`) back-propagates from a target to the
images (METHOD section 1, steps 1-3). Targets: "conv_max", the sum over positions of the
channel-wise maximum of the last ReLU after a convolution (torchvision VGG19: `features[35]`,
the paper's); "logit", the top-class logit; or given class indices. Two paths compute the same
responses:

- "reverse_walk" (sequential CNNs, `frmap.engine.reverse_walk`): keeps 1 bit per ReLU input and
  the argmax of each max-pool window instead of the activations;
- "autograd": any model whose ReLUs are `nn.ReLU` modules: they are swapped for `ReLURule`s and
  autograd differentiates the target with respect to the images only (no parameter gradient).
  A ReLU called as a function would silently back-propagate the plain gradient, so the forward
  runs under a guard that raises, naming the module that calls it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from frmap.kernels import RULES, ReLURule, response_score, swap_relus

from .models import Normalized
from .reverse_walk import ReverseWalk, conv_max_index, sequential_layers, target_indices

TARGETS = ("conv_max", "logit")
PATHS = ("auto", "reverse_walk", "autograd")
PREPROCESS = ("imagenet", None)

Target = str | int | Sequence[int] | torch.Tensor

_FUNCTIONAL_RELUS = {F.relu: "torch.nn.functional.relu", F.relu_: "torch.nn.functional.relu_",
                     torch.relu: "torch.relu", torch.relu_: "torch.relu_",
                     torch.Tensor.relu: "Tensor.relu", torch.Tensor.relu_: "Tensor.relu_"}


@dataclass(frozen=True)
class EngineConfig:
    """How a `ResponseEngine` computes (see its arguments)."""

    rule: str = "guided"
    target: str | int = "conv_max"
    batch_size: int = 8
    preprocess: str | None = "imagenet"
    path: str = "auto"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        _check_target(self.target)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be 'imagenet' or None, got {self.preprocess!r}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; choose one of {', '.join(PATHS)}")


def _check_target(target: object) -> None:
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; use {', '.join(TARGETS)} or classes")
    elif isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be {', '.join(TARGETS)} or a class index, got {target!r}")


class ResponseEngine:
    """Feature responses and detection scores of images for one model.

    Args:
        model: a CNN taking [N, C, H, W] images; its ReLUs must be `nn.ReLU` modules. It is put
            in eval mode while the engine runs and left exactly as it was afterwards.
        rule: "guided" (the paper's), "deconvnet" or "gradient".
        target: "conv_max" (the paper's), "logit" (top class) or one class index for every
            image; `responses`/`scores` may override it per call, also with one class per image.
        batch_size: images per pass through the model (halved, with a warning, when a batch
            does not fit in memory).
        device: where to compute; the model must already be there (default: where it is).
        preprocess: "imagenet" normalises [0, 1] RGB images with the ImageNet mean/std inside
            the differentiable model; None feeds the images as they are (any channel count).
        path: "reverse_walk", "autograd", or "auto" (the walk where the model is a chain).

    Raises:
        ValueError: a bad setting, a model on another device, or path="reverse_walk" for a
            model that is not a chain of supported layers.
    """

    def __init__(self, model: nn.Module, *, rule: str = "guided", target: str | int = "conv_max",
                 batch_size: int = 8, device: str | torch.device | None = None,
                 preprocess: str | None = "imagenet", path: str = "auto") -> None:
        self.config = EngineConfig(rule, target, batch_size, preprocess, path)
        self.model = model
        params = next(model.parameters(), None)
        self.device = params.device if params is not None else torch.device("cpu")
        wanted = self.device if device is None else torch.device(device)
        if wanted.type != self.device.type or wanted.index not in (None, self.device.index):
            raise ValueError(f"the model is on {self.device}, not on {wanted}: move it first")
        self.dtype = params.dtype if params is not None else torch.float32
        self._net = Normalized(model).to(self.device) if preprocess == "imagenet" else model
        self.channels = self._input_channels()
        layers = sequential_layers(self._net)
        if path == "reverse_walk" and layers is None:
            raise ValueError(f"{type(model).__name__} is not a chain of layers the reverse walk "
                             "supports; use path='autograd' or 'auto'")
        self._walk = ReverseWalk(layers, rule) if layers is not None and path != "autograd" \
            else None
        self._walk_checked = False

    @property
    def path(self) -> str:
        """The path in use: "reverse_walk" or "autograd"."""
        return "reverse_walk" if self._walk is not None else "autograd"

    def responses(self, images: torch.Tensor | np.ndarray,
                  target: Target | None = None) -> torch.Tensor:
        """Feature responses of `images`, with respect to the images as given.

        Args:
            images: [N, C, H, W] floats in [0, 1], N >= 1, C the model's input channels.
            target: overrides the engine's target: "conv_max", "logit", a class index, or N
                class indices (one per image).

        Returns:
            [N, C, H, W] float responses, in input order, on the images' device.
        """
        x, classes = self._prepare(images, target)
        parts = list(self._map_batches(self._responses, x, classes))
        return torch.cat(parts).to(_device_of(images))

    def scores(self, images: torch.Tensor | np.ndarray,
               footprint: torch.Tensor | np.ndarray, target: Target | None = None, *,
               backend: str = "auto") -> torch.Tensor:
        """Detection scores: mean local entropy (bits) of each image's response image.

        Equal to `frmap.kernels.response_score(self.responses(images), footprint)`, batch by
        batch (responses are not kept). Higher = more likely adversarial.

        Args:
            images: as for `responses`; the model must take 1 or 3 channels.
            footprint: [h, w] binary window of the local entropy.
            target: as for `responses`.
            backend: backend of `response_score`.

        Returns:
            [N] float64 scores on the images' device.
        """
        x, classes = self._prepare(images, target)
        response_score(torch.zeros(1, 1, 1, 1), footprint, backend=backend)  # check it first
        parts = list(self._map_batches(
            lambda b, c: response_score(self._responses(b, c), footprint, backend=backend),
            x, classes))
        return torch.cat(parts).to(_device_of(images))

    def _input_channels(self) -> int | None:
        if isinstance(self._net, Normalized):
            return self._net.channels
        conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return None if conv is None else conv.in_channels

    def _prepare(self, images: object, target: Target | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated images and the per-image classes (None for conv_max)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch tensor or numpy array, got "
                            f"{type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got {images.dtype} "
                            "(divide uint8 images by 255)")
        if images.dim() != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        n, c, h, w = images.shape
        if n == 0:
            raise ValueError("images is an empty batch (N = 0)")
        if self.channels is not None and c != self.channels:
            hint = " (preprocess='imagenet' takes RGB; use preprocess=None)" if isinstance(
                self._net, Normalized) else ""
            raise ValueError(f"the model takes {self.channels}-channel images, got {c} channels "
                             f"(shape {tuple(images.shape)}){hint}")
        if h == 0 or w == 0:
            raise ValueError(f"images have an empty spatial shape {(h, w)}")
        bad = ~torch.isfinite(images)
        if bad.any():
            where = bad.flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"images hold {int(bad.sum())} NaN or Inf values (images {where[:10]})")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 1:
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        return images, self._classes(self.config.target if target is None else target, n)

    @staticmethod
    def _classes(target: Target, n: int) -> torch.Tensor | None:
        if isinstance(target, str):
            _check_target(target)
            return None if target == "conv_max" else torch.full((n,), -1)  # -1: the top class
        if isinstance(target, int):
            _check_target(target)
            return torch.full((n,), target)
        classes = torch.as_tensor(target)
        if classes.shape != (n,) or classes.is_floating_point() or classes.dtype == torch.bool:
            raise ValueError(f"per-image target must be {n} integer class indices, got "
                             f"{classes.dtype} of shape {tuple(classes.shape)}")
        if (classes < 0).any():
            raise ValueError(f"class indices must be >= 0, got {classes.min().item()}")
        return classes.long()

    def _map_batches(self, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                     images: torch.Tensor, classes: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """fn over fixed-size batches in order; a batch that runs out of memory is split."""
        size, start = self.config.batch_size, 0
        while start < len(images):
            stop = min(start + size, len(images))
            try:
                out = fn(images[start:stop], None if classes is None else classes[start:stop])
            except RuntimeError as err:
                if stop - start == 1 or not _out_of_memory(err):
                    raise
                out = None  # retry outside the handler, so the failed batch's memory is freed
            if out is None:
                size = (stop - start) // 2
                warnings.warn(f"a batch of {stop - start} images did not fit in memory; "
                              f"continuing with batches of {size}", RuntimeWarning, stacklevel=3)
                continue
            yield out
            start = stop

    def _responses(self, images: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """Responses of one batch (validated images; classes with -1 for the top class)."""
        x = images.to(self.device, self.dtype)
        classes = None if classes is None else classes.to(self.device)
        with _eval_mode(self.model):
            if self._walk is None:
                return self._autograd_responses(x, classes)
            if not self._walk_checked:
                return self._first_walk(x, classes)
            return self._walk.responses(x, classes)

    def _first_walk(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """The first batch: walk, then check the walk's forward against the model's own.

        The check comes after the batch so that it adds nothing to the batch's peak memory. A
        chain that does not reproduce the model's forward falls back to autograd, or raises for
        path="reverse_walk".
        """
        failure = responses = None
        try:
            responses = self._walk.responses(x, classes)
        except RuntimeError as err:  # e.g. a chain whose shapes do not fit: the check decides
            if _out_of_memory(err):
                raise
            failure = err
        matches = self._walk_matches(x[:1])
        self._walk_checked = True
        if matches:
            if failure is not None:
                raise failure
            return responses
        if self.config.path == "reverse_walk":
            raise ValueError(f"{type(self.model).__name__}'s forward is not the chain of its "
                             "layers; use path='autograd'")
        self._walk = None
        return self._autograd_responses(x, classes)

    def _walk_matches(self, x: torch.Tensor) -> bool:
        """Whether the walk's forward gives what the model's own forward gives."""
        with torch.no_grad(), _no_functional_relu(self.model):
            expected = self._net(x)
        try:
            got = self._walk.logits(x)
        except RuntimeError:
            return False
        scale = float(expected.abs().nan_to_num().max()) if expected.numel() else 0.0
        return got.shape == expected.shape and torch.allclose(
            got, expected, rtol=1e-4, atol=1e-5 * scale + 1e-6, equal_nan=True)

    def _autograd_responses(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        x = x.detach().clone().requires_grad_()
        with torch.enable_grad(), swap_relus(self.model, self.config.rule), \
                _trace_relus(self.model) as trace, _no_functional_relu(self.model):
            out = self._net(x)
        if classes is None:
            out = trace[conv_max_index([m for m, _ in trace])][1]
        objective = out.gather(1, target_indices(out.detach(), classes)).sum()
        (grad,) = torch.autograd.grad(objective, x)
        return grad


def _device_of(images: object) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")


def _out_of_memory(err: RuntimeError) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text or \
        "out of memory" in text


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


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


@contextmanager
def _no_functional_relu(model: nn.Module) -> Iterator[None]:
    """Inside, a ReLU called as a function anywhere in `model`'s forward raises ValueError."""
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
        with _FunctionalReLUGuard(running):
            yield
    finally:
        for h in handles:
            h.remove()
