"""One loss gradient per image, then each image's smallest successful epsilon on a grid:
`FGSM` (Linf) and `GradientAttack` (L2).

The gradient does not depend on epsilon, so it is computed once; epsilon is then bisected over
the sorted grid with forward passes only. The candidates repeat foolbox 3's arithmetic
(`LinfFastGradientAttack` / `L2FastGradientAttack` followed by its epsilon clipping) operation by
operation, so they are bitwise foolbox's; where success grows monotonically with epsilon (it
does on the digits), the minimal epsilon is the one foolbox's own sweep over the same grid finds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frmap.engine.attacks.base import BATCH, Perturbation, l2_norms, per_image
from frmap.engine.models.predict import predict

LINF_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 0.5, 151)[1:])
L2_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 10.0, 151)[1:])

# (x0, direction, epsilon [N]) -> the perturbed images
Candidates = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _l2_clip(p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # foolbox: p * min(1, eps / max(||p||, 1e-12)); foolbox divides a Python float by a tensor,
    # which torch evaluates as reciprocal(norm) * eps, so the same is done here.
    factor = torch.clamp(l2_norms(p).clamp_min(1e-12).reciprocal() * eps, max=1.0)
    return per_image(factor, p.ndim) * p


def _linf_candidates(x0: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """foolbox's FGSM step: x0 + eps * sign(g), projected, clipped to [0, 1], clipped again."""
    e = per_image(eps, x0.ndim)
    x = x0 + e * direction
    x = (x0 + torch.clamp(x - x0, -e, e)).clamp(0.0, 1.0)
    return x0 + torch.clamp(x - x0, -e, e)


def _l2_candidates(x0: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """foolbox's L2 step: x0 + eps * g / ||g||, projected, clipped to [0, 1], clipped again."""
    x = x0 + per_image(eps, x0.ndim) * direction
    x = (x0 + _l2_clip(x - x0, eps)).clamp(0.0, 1.0)
    return x0 + _l2_clip(x - x0, eps)


def _loss_gradient(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    grads = []
    for i in range(0, len(x0), BATCH):
        x = x0[i : i + BATCH].clone().requires_grad_()
        with torch.enable_grad():
            F.cross_entropy(model(x), labels[i : i + BATCH], reduction="none").sum().backward()
        grads.append(x.grad)
    return torch.cat(grads)


def _misclassified(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return predict(model, x, BATCH)[0] != labels


def _min_epsilon(
    model: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    direction: torch.Tensor,
    grid: torch.Tensor,
    candidates: Candidates,
) -> Perturbation:
    """Bisect each image's smallest successful epsilon over the sorted `grid`.

    Invariant: `grid[hi]` succeeds, `grid[lo]` fails (`lo = -1` stands for epsilon 0, the
    correctly classified input). Each round halves `hi - lo` with one forward pass per image.
    """
    n, k = len(x0), len(grid)
    top = torch.full((n,), k - 1, device=x0.device)
    found = _misclassified(model, candidates(x0, direction, grid[top]), labels)
    lo, hi = torch.full_like(top, -1), top
    while True:
        open_ = found & (hi - lo > 1)
        if not open_.any():
            break
        mid = (lo + hi) // 2
        hit = _misclassified(
            model, candidates(x0[open_], direction[open_], grid[mid[open_]]), labels[open_]
        )
        hi[open_] = torch.where(hit, mid[open_], hi[open_])
        lo[open_] = torch.where(hit, lo[open_], mid[open_])
    eps = grid[hi]
    adversarial = torch.where(per_image(found, x0.ndim), candidates(x0, direction, eps), x0)
    return adversarial, found, eps.double()


def check_grid(epsilons: tuple[float, ...]) -> None:
    grid = np.asarray(epsilons, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or not np.all(grid > 0) or np.any(np.diff(grid) <= 0):
        raise ValueError(
            "epsilons must be a non-empty, strictly increasing sequence of positive numbers"
        )


@dataclass(frozen=True)
class _SingleStep:
    """One loss gradient per image, then its smallest successful epsilon on `epsilons`."""

    epsilons: tuple[float, ...]

    def __post_init__(self) -> None:
        check_grid(self.epsilons)

    def _step(self, grad: torch.Tensor) -> tuple[torch.Tensor, Candidates]:
        raise NotImplementedError

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        direction, candidates = self._step(_loss_gradient(model, x0, labels))
        grid = torch.tensor(self.epsilons, dtype=x0.dtype, device=x0.device)
        return _min_epsilon(model, x0, labels, direction, grid, candidates)


@dataclass(frozen=True)
class FGSM(_SingleStep):
    """Fast gradient sign method (Linf) with each image's smallest successful grid epsilon."""

    name: ClassVar[str] = "fgsm"
    epsilons: tuple[float, ...] = LINF_EPSILONS

    def _step(self, grad: torch.Tensor) -> tuple[torch.Tensor, Candidates]:
        return grad.sign(), _linf_candidates


@dataclass(frozen=True)
class GradientAttack(_SingleStep):
    """Single L2 gradient step (fast gradient method) with each image's smallest grid epsilon."""

    name: ClassVar[str] = "gradient"
    epsilons: tuple[float, ...] = L2_EPSILONS

    def _step(self, grad: torch.Tensor) -> tuple[torch.Tensor, Candidates]:
        # foolbox's normalize_lp_norms: g * (1 / max(||g||, 1e-12))
        norms = l2_norms(grad).clamp_min(1e-12).reciprocal()
        return grad * per_image(norms, grad.ndim), _l2_candidates
