"""Classifiers by name: the embedded digits CNN or a torchvision VGG, with how they take images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frmap.engine.data.images import DIGITS_IMAGES, IMAGENET_IMAGES, ImageSpec
from frmap.engine.models.digits import CHECKPOINT, load_digits_model
from frmap.engine.models.vgg import VGG_ARCHS, Normalized, load_vgg

MODELS = ("digits", *VGG_ARCHS)


@dataclass(frozen=True)
class NamedModel:
    """A loaded classifier with how its inputs are read and preprocessed.

    Attributes:
        name: one of `MODELS`.
        model: the network (what the response engine wraps; `preprocess` applies on top).
        classifier: what [N, C, H, W] images in [0, 1] go through.
        preprocess: "imagenet" or None.
        spec: how image files are brought to the model's input.
    """

    name: str
    model: nn.Module
    classifier: nn.Module
    preprocess: str | None
    spec: ImageSpec


def load_model(name: str, weights: str | Path | None = None, *, seed: int = 0,
               device: str | torch.device = "cpu") -> NamedModel:
    """The classifier `name` on `device`, in eval mode.

    Args:
        name: "digits" (the shipped checkpoint, or `weights`) or a torchvision VGG.
        weights: a weights file, or for a VGG a torchvision weights name; None: the shipped
            digits checkpoint, or random VGG weights drawn from `seed`.

    Raises:
        ValueError: an unknown name or weights that do not fit.
        FileNotFoundError: a weights file that does not exist.
    """
    if name == "digits":
        model = load_digits_model(weights or CHECKPOINT).to(device)
        return NamedModel(name, model, model, None, DIGITS_IMAGES)
    if name not in VGG_ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model = load_vgg(name, weights, seed=seed).to(device)
    return NamedModel(name, model, Normalized(model), "imagenet", IMAGENET_IMAGES)
