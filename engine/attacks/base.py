"""What every attack shares: the `Attack` protocol, `AttackResult` and `run_attack`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from frmap.engine.models.predict import predict
from frmap.engine.models.runtime import model_device

BATCH = 256

# (adversarial [N, ...], found [N] bool, epsilon [N] float64)
Perturbation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttackResult:
    """What an attack did to each of N input images.

    Attributes:
        attacked: `[N]` bool, the inputs the model classified correctly (only those are attacked).
        success: `[N]` bool, attacked and now classified as another class.
        adversarial: `[N, C, H, W]` float32, the adversarial image (the input where no success).
        adv_labels: `[N]` int64, the class predicted for `adversarial`.
        true_confidence: `[N]` float32, the probability of the true class on `adversarial`.
        adv_confidence: `[N]` float32, the probability of `adv_labels` on `adversarial`.
        epsilon: `[N]` float64, the perturbation size in the attack's norm (NaN where no
            success): the smallest successful grid epsilon for FGSM and the gradient attack,
            the L2 distance for DeepFool and Boundary, the number of changed pixels for
            the one-pixel attack.
    """

    attacked: torch.Tensor
    success: torch.Tensor
    adversarial: torch.Tensor
    adv_labels: torch.Tensor
    true_confidence: torch.Tensor
    adv_confidence: torch.Tensor
    epsilon: torch.Tensor


class Attack(Protocol):
    """An attack: a frozen config with a `name`, whose `perturb` crafts candidates.

    `run_attack` calls `perturb` on the correctly classified images only, with the model in
    eval mode without parameter gradients, and keeps a candidate only where the model then
    predicts another class.
    """

    name: ClassVar[str]

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        """Candidates for `x0` [N, C, H, W] in [0, 1] of true classes `labels` [N].

        Returns:
            (adversarial [N, C, H, W], found [N] bool, epsilon [N] float64: the perturbation
            size in the attack's norm).
        """
        ...


def per_image(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).square().sum(1).sqrt()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (eagerpy would accumulate `.grad`), then restore."""
    training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(training)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def check_inputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Check what the attacks take: `images` `[N, C, H, W]` floating point in [0, 1] that
    `model` accepts, `labels` `[N]` integers among the model's classes.

    Raises:
        TypeError: Not tensors, images not floating point or labels not integers.
        ValueError: Wrong shapes, values outside [0, 1], NaN or Inf, images the model rejects,
            labels outside [0, K).
    """
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("images and labels must be torch tensors")
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or Inf values")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must have shape [N] = [{len(images)}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    try:
        with _frozen(model), torch.no_grad():
            classes = model(images[:1].to(model_device(model), torch.float32)).shape[-1]
    except RuntimeError as err:
        raise ValueError(
            f"the model rejects images of shape {tuple(images.shape[1:])}: {err}"
        ) from err
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes}), the model's classes; got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def run_attack(
    attack: Attack,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """Attack the correctly classified images; keep adversarials the model now misclassifies.

    Args:
        attack: An attack config (`FGSM()`, `OnePixel(population=50)`, `make_attack("boundary")`).
        model: A classifier taking `[N, C, H, W]` images in [0, 1] and returning logits `[N, K]`.
            It runs in eval mode without parameter gradients; both are restored afterwards.
        images: `[N, C, H, W]` floating point in [0, 1], any number of channels.
        labels: `[N]` integer true classes in [0, K).
        seed: Seeds the attack's randomness (torch's global generator is forked, not disturbed).
        progress: Show a progress bar on the attack's long loops.

    Returns:
        The per-image outcome; see `AttackResult`.

    Raises:
        TypeError, ValueError: See `check_inputs`.
    """
    check_inputs(model, images, labels)
    device = model_device(model)
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    with _frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        clean, clean_probs = predict(model, x, BATCH)
        attacked = clean == y
        adversarial, found = x.clone(), torch.zeros_like(attacked)
        epsilon = torch.full((len(x),), math.nan, dtype=torch.float64, device=device)
        if attacked.any():
            rng = np.random.default_rng(seed)
            adv, hit, eps = attack.perturb(model, x[attacked], y[attacked], rng, progress)
            adversarial[attacked], found[attacked], epsilon[attacked] = adv, hit, eps.to(device)
        predicted, probs = predict(model, adversarial, BATCH)
    success = attacked & found & (predicted != y)
    keep = success[:, None]
    probs = torch.where(keep, probs, clean_probs)
    predicted = torch.where(success, predicted, clean)
    return AttackResult(
        attacked=attacked.cpu(),
        success=success.cpu(),
        adversarial=torch.where(per_image(success, x.ndim), adversarial, x).cpu(),
        adv_labels=predicted.cpu(),
        true_confidence=probs.gather(1, y[:, None])[:, 0].cpu(),
        adv_confidence=probs.gather(1, predicted[:, None])[:, 0].cpu(),
        epsilon=torch.where(success, epsilon, math.nan).cpu(),
    )
