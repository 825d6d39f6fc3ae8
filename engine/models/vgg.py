"""The CNNs the engine explains: torchvision VGGs, their weights, and ImageNet normalisation.

Weights come from a torchvision weights name (downloaded by torchvision), a local file (a state
dict saved with `torch.save`, read with `weights_only=True`, or a safetensors file), or a
seeded random initialisation (tests, benchmarks). Images for these models are [0, 1] RGB
tensors; `Normalized` applies the ImageNet mean/std inside the model, so responses stay with
respect to the images themselves. Files are brought to 224x224 (resize 256, centre crop) by
`frmap.engine.images`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """`model((x - mean) / std)` with per-channel mean and std: normalisation as a layer."""

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean {mean} and std {std} must have one value per channel, std > 0")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std, on x's device and dtype."""
        return (x - self.mean.to(x)) / self.std.to(x)


def load_vgg(arch: str = "vgg19", weights: str | Path | None = None, *,
             seed: int = 0) -> nn.Module:
    """A torchvision VGG in eval mode.

    Args:
        arch: one of `VGG_ARCHS`.
        weights: None for a random initialisation drawn from `seed`; a path to a state-dict
            file (`.pt`/`.pth` read with `weights_only=True`, or `.safetensors`); or a torchvision
            weights name ("DEFAULT", "IMAGENET1K_V1", ...), which torchvision may download.
        seed: seed of the random initialisation (the global RNG is left as it was).

    Raises:
        ValueError: unknown architecture or weights name, or a file that is not a state dict of
            this architecture.
    """
    if arch not in VGG_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(VGG_ARCHS)}")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = torchvision.models.get_model(arch)
    elif isinstance(weights, Path) or Path(weights).suffix in (".pt", ".pth", ".safetensors"):
        model = load_weights(torchvision.models.get_model(arch), weights)
    else:
        model = torchvision.models.get_model(arch, weights=weights_enum(arch, weights))
    return model.eval()


def weights_enum(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights `name` ("DEFAULT", "IMAGENET1K_V1", ...) of `arch`."""
    options = torchvision.models.get_model_weights(arch)
    try:
        return options[name.removeprefix(f"{options.__name__}.")]
    except KeyError:
        known = ", ".join(["DEFAULT", *(w.name for w in options)])
        raise ValueError(
            f"{name!r} is neither a weights file (.pt, .pth, .safetensors) nor a torchvision "
            f"weights name of {arch} ({known})"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file: safetensors, or `torch.load(weights_only=True)`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a state dict of tensors (torch.load with weights_only=True refused "
            f"it: {first})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state-dict file into `model` (strictly: same names, same shapes) and return it.

    Tensors are never cast: an integer tensor where the model has floating-point weights is
    refused, as is a weight holding NaN or Inf.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a state dict, belongs to another architecture, or holds
            integer or non-finite values where the model has floating-point weights.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None or not want.is_floating_point():
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, but the model's is "
                             f"{want.dtype}; refusing to cast it (save floating-point weights)")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf values")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        problems = "; ".join(line if len(line) <= 200 else line[:200] + " ..." for line in lines)
        raise ValueError(f"{path} does not fit {type(model).__name__}: {problems}") from None
    return model
