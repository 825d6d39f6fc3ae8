"""Layer features from one forward pass, and what the activation-space detectors share.

`collect_features` runs the model once over a batch of images and keeps, for each chosen
layer, its output globally average-pooled over the spatial positions, together with the
logits. Every detector that needs features or the model's prediction scores from that one
pass. Models take [0, 1] images, with any normalisation inside the model (ImageNet VGGs as
`frmap.engine.models.Normalized(vgg)`), so the features see what the responses see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from frmap.engine.models.runtime import model_device


@dataclass(frozen=True)
class Features:
    """Pooled layer outputs and logits of N images.

    Attributes:
        layers: layer name -> `[N, D]` float32, the output averaged over its spatial positions.
        logits: `[N, K]` float32, the model's output.
    """

    layers: dict[str, np.ndarray]
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def predictions(self) -> np.ndarray:
        """`[N]` int64, the predicted classes."""
        return self.logits.argmax(1)

    @property
    def probabilities(self) -> np.ndarray:
        """`[N, K]` float64, the softmax of the logits."""
        z = self.logits.astype(np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def layer(self, name: str) -> np.ndarray:
        """`[N, D]` the features of one layer, with a clear error where there are none."""
        if name not in self.layers:
            raise ValueError(f"the features hold no layer {name!r}; they hold {list(self.layers)}")
        return self.layers[name]

    def take(self, index: np.ndarray) -> Features:
        """The images at `index` (integers or a boolean mask)."""
        return Features({k: v[index] for k, v in self.layers.items()}, self.logits[index])

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        """The images of `parts` one after another (all parts must hold the same layers)."""
        if not parts:
            raise ValueError("concat needs at least one part")
        names = list(parts[0].layers)
        if any(list(p.layers) != names for p in parts):
            raise ValueError("concat needs parts with the same layers")
        return cls(
            {k: np.concatenate([p.layers[k] for p in parts]) for k in names},
            np.concatenate([p.logits for p in parts]),
        )


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The default feature layers of a VGG-like model, as `model.named_modules()` names.

    The first submodule (the model itself included) with `features` and `classifier`
    `nn.Sequential`s defines them: the output of every `nn.MaxPool2d` in `features` (the conv
    blocks; five for torchvision's VGG, three for `DigitsCNN`), then of every `nn.ReLU` in
    `classifier` (the hidden layers; two for VGG, one for `DigitsCNN`).

    Raises:
        ValueError: the model has no such layout.
    """
    for name, module in model.named_modules():
        features = getattr(module, "features", None)
        classifier = getattr(module, "classifier", None)
        if isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential):
            prefix = f"{name}." if name else ""
            blocks = [f"{prefix}features.{i}" for i, m in enumerate(features)
                      if isinstance(m, nn.MaxPool2d)]
            hidden = [f"{prefix}classifier.{i}" for i, m in enumerate(classifier)
                      if isinstance(m, nn.ReLU)]
            if blocks or hidden:
                return (*blocks, *hidden)
    raise ValueError(
        f"{type(model).__name__} has no VGG-like `features`/`classifier` layout; name the layers"
    )


def _pool(output: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W] -> [B, C]`, the mean over every dimension after the first; `[B, D]` stays."""
    return output.flatten(2).mean(2) if output.ndim > 2 else output.clone()


def _modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The modules named `layers`, with a clear error for names the model lacks."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no layers {missing}")
    return {n: modules[n] for n in layers}


@contextmanager
def _pooled_hooks(modules: dict[str, nn.Module],
                  keep: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks that hand each module's pooled output (`_pool`) to `keep(name, output)`;
    removed on leaving, also when the forward pass raises."""
    def hook(name: str):
        def call(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            keep(name, _pool(output))
        return call

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pooled_outputs(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str]
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One forward pass of `x` keeping the graph: (the layers' pooled outputs, the logits).

    What `collect_features` keeps, as tensors differentiable in `x` (for input gradients of a
    feature-based score); the hooks are removed before returning.
    """
    outputs: dict[str, torch.Tensor] = {}
    with _pooled_hooks(_modules(model, layers), outputs.__setitem__):
        logits = model(x)
    return tuple(outputs[n] for n in layers), logits


@torch.no_grad()
def collect_features(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 128,
) -> Features:
    """Run `model` once over `images` and keep the chosen layers' pooled outputs and the logits.

    A forward hook on each layer averages its output over every dimension after the first
    (`[B, C, H, W] -> [B, C]`; `[B, D]` stays). The hooks are removed before returning, also
    when the forward pass raises.

    Args:
        model: A classifier in eval mode returning logits `[N, K]`.
        images: `[N, ...]` model inputs; each batch is moved to the model's device.
        layers: Names from `model.named_modules()`; by default `default_layers(model)`.
        batch_size: Images per forward pass.

    Returns:
        The features, float32 on the CPU, in the order of `images`.
    """
    names = tuple(default_layers(model) if layers is None else layers)
    modules = _modules(model, names)
    if len(set(names)) != len(names):
        raise ValueError(f"layers named more than once: {names}")
    if len(images) == 0 or batch_size < 1:
        raise ValueError("collect_features needs at least one image and batch_size >= 1")
    device = model_device(model)
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    logits = []
    with _pooled_hooks(modules, lambda n, output: outputs[n].append(output.float().cpu())):
        for start in range(0, len(images), batch_size):
            logits.append(model(images[start:start + batch_size].to(device)).float().cpu())
            calls = {n: len(v) for n, v in outputs.items() if len(v) != len(logits)}
            if calls:
                raise ValueError(f"layers not called exactly once per forward pass: {calls}")
    return Features(
        {n: torch.cat(v).numpy() for n, v in outputs.items()}, torch.cat(logits).numpy()
    )
