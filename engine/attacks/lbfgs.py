"""Box-constrained L-BFGS (Szegedy et al. 2014) on SciPy's L-BFGS-B, untargeted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, minimize
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks.base import BATCH, Perturbation, l2_norms
from frmap.engine.models.predict import predict
from frmap.engine.models.runtime import one_blas_thread

_SEARCH_FACTOR = 10.0  # c is multiplied or divided by this until it is bracketed


def _solve(model: nn.Module, x0: torch.Tensor, target: torch.Tensor, c: np.ndarray,
           maxiter: int) -> torch.Tensor:
    """The minimiser of `sum_i c_i ||x_i - x0_i||^2 + CE(model(x_i), target_i)` over x in
    [0, 1], from x0: one L-BFGS-B problem, as the images' terms are independent."""
    start = x0.double().cpu().numpy().ravel()
    weight = np.repeat(c, start.size // len(c))

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.from_numpy(z).view(x0.shape).to(x0.device, x0.dtype).requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), target, reduction="sum")
            loss.backward()
        r = z - start
        value = float(weight @ np.square(r)) + loss.item()
        return value, 2 * weight * r + x.grad.double().cpu().numpy().ravel()

    # L-BFGS-B's BLAS calls on vectors this size gain nothing from threads; OpenBLAS's
    # waiting threads only contend with torch's (a solve took 9x longer on 2 busy cores)
    with one_blas_thread():
        found = minimize(objective, start, jac=True, method="L-BFGS-B",
                         bounds=Bounds(0.0, 1.0), options={"maxiter": maxiter})
    return torch.from_numpy(found.x).view(x0.shape).to(x0.device, x0.dtype)


@dataclass(frozen=True)
class LBFGS:
    """Szegedy et al.'s box-constrained L-BFGS attack, untargeted; epsilon is the L2 distance.

    Each image `x0` of true class `y` gets as target `t` the class the model ranks second on
    `x0` (the most likely wrong class). For a constant `c > 0`, SciPy's L-BFGS-B (`maxiter`
    iterations, the box [0, 1] as bounds, the gradient from torch) minimises

        c * ||x - x0||_2^2 + CE(model(x), t)   over x in [0, 1]^n, from x = x0.

    A smaller `c` buys a larger perturbation. The line search on `c`, one per image, looks for
    the largest `c` whose minimiser the model misclassifies (as any class but `y`): from
    `initial_const`, `c` is multiplied by 10 after a success and divided by 10 after a failure
    until a success and a failure bracket it, then bisected geometrically; `search_steps` solves
    in all. Each image keeps its smallest successful perturbation; one that never succeeds
    fails. The images of a batch share each solve: their terms are independent and the bounds
    are per element, so the batch is one problem whose objective is the sum over its images.
    """

    name: ClassVar[str] = "lbfgs"
    search_steps: int = 8
    maxiter: int = 50
    initial_const: float = 1.0

    def __post_init__(self) -> None:
        if self.search_steps < 1 or self.maxiter < 1:
            raise ValueError(f"{self.name} needs search_steps >= 1 and maxiter >= 1, got "
                             f"{self.search_steps} and {self.maxiter}")
        if not (self.initial_const > 0 and math.isfinite(self.initial_const)):
            raise ValueError(f"{self.name} needs a finite initial_const > 0, got "
                             f"{self.initial_const}")

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        _, probs = predict(model, x0, BATCH)
        target = probs.scatter(1, labels[:, None], -1.0).argmax(1)
        n = len(x0)
        c = np.full(n, self.initial_const)
        good, bad = np.zeros(n), np.full(n, np.inf)  # largest c that succeeded, smallest failed
        adversarial = x0.clone()
        best = torch.full((n,), math.inf, dtype=torch.float64, device=x0.device)
        for _ in tqdm(range(self.search_steps), desc=self.name, unit="solve", leave=False,
                      disable=not progress):
            x = _solve(model, x0, target, c, self.maxiter)
            hit = predict(model, x, BATCH)[0] != labels
            distance = l2_norms((x - x0).double())
            better = hit & (distance < best)
            adversarial[better], best[better] = x[better], distance[better]
            success = hit.cpu().numpy()
            good, bad = np.where(success, c, good), np.where(success, bad, c)
            c = np.where(np.isinf(bad), c * _SEARCH_FACTOR,
                         np.where(good == 0, c / _SEARCH_FACTOR, np.sqrt(good * bad)))
        found = best.isfinite()
        return adversarial, found, torch.where(found, best, math.nan)
