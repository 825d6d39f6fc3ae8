"""foolbox's attacks: DeepFool (`L2DeepFoolAttack`), the decision-based `BoundaryAttack` (started
from `LinearSearchBlendedUniformNoiseAttack`), the iterative Linf attacks PGD (`LinfPGD`), BIM
(`LinfBasicIterativeAttack`) and MI-FGSM (`LinfMomentumIterativeFastGradientMethod`) with each
image's smallest successful epsilon on a grid, and Carlini-Wagner L2 (`L2CarliniWagnerAttack`,
whose binary search over its constant already looks for the smallest perturbation)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import foolbox
import numpy as np
import torch
from torch import nn

from frmap.engine.attacks.base import Perturbation, l2_norms
from frmap.engine.attacks.single_step import check_grid


def _l2_distance(adversarial: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return l2_norms((adversarial - x0).double())


def _foolbox_model(model: nn.Module, x0: torch.Tensor) -> foolbox.PyTorchModel:
    return foolbox.PyTorchModel(model, bounds=(0, 1), device=x0.device)


class _UnboundedL2:
    """A foolbox minimal-perturbation attack (`_attack`), unbounded; epsilon is the L2
    distance."""

    def _attack(self) -> foolbox.attacks.base.Attack:
        raise NotImplementedError

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        _, adversarial, found = self._attack()(_foolbox_model(model, x0), x0, labels,
                                               epsilons=None)
        return adversarial, found, _l2_distance(adversarial, x0)


@dataclass(frozen=True)
class DeepFool(_UnboundedL2):
    """foolbox's `L2DeepFoolAttack` (logits loss) over the `candidates` most likely classes."""

    name: ClassVar[str] = "deepfool"
    steps: int = 50
    candidates: int = 10
    overshoot: float = 0.02

    def _attack(self) -> foolbox.attacks.base.Attack:
        return foolbox.attacks.L2DeepFoolAttack(
            steps=self.steps, candidates=self.candidates, overshoot=self.overshoot
        )


@dataclass(frozen=True)
class BlendedNoiseStart:
    """foolbox's `LinearSearchBlendedUniformNoiseAttack`, which finds the boundary attack's
    starting points: `directions` uniform-noise draws, `steps` blending steps each."""

    directions: int = 100
    steps: int = 50

    def __post_init__(self) -> None:
        if self.directions < 1 or self.steps < 1:
            raise ValueError("the boundary attack's start needs directions >= 1 and steps >= 1, "
                             f"got {self.directions} and {self.steps}")


@dataclass(frozen=True)
class Boundary:
    """foolbox's decision-based `BoundaryAttack` for `steps` steps, from `start`.

    Images for which `start` finds no adversarial fail. The step sizes and the interval of the
    step-size adaptation differ from foolbox's defaults (0.01, 0.01, 10) to make a short run
    count: on 31 digits after 1000 steps the median L2 distance is 3.9 with these and 11.1
    with foolbox's.
    """

    name: ClassVar[str] = "boundary"
    steps: int = 1000
    spherical_step: float = 0.05
    source_step: float = 0.05
    update_stats_every_k: int = 2
    start: BlendedNoiseStart = BlendedNoiseStart()

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        fmodel = _foolbox_model(model, x0)
        init = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack(
            directions=self.start.directions, steps=self.start.steps
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # init warns when some images get no start
            _, starts, found = init(fmodel, x0, labels, epsilons=None)
        adversarial = x0.clone()
        if found.any():
            attack = foolbox.attacks.BoundaryAttack(
                steps=self.steps,
                spherical_step=self.spherical_step,
                source_step=self.source_step,
                update_stats_every_k=self.update_stats_every_k,
            )
            _, best, _ = attack(
                fmodel, x0[found], labels[found], epsilons=None, starting_points=starts[found]
            )
            adversarial[found] = best
        return adversarial, found, _l2_distance(adversarial, x0)


ITERATIVE_EPSILONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class _LinfIterative:
    """A foolbox Linf attack run at every epsilon of the grid; each image keeps the adversarial
    of its smallest successful epsilon (foolbox's own sweep: `attack(..., epsilons=grid)`)."""

    epsilons: tuple[float, ...] = ITERATIVE_EPSILONS
    steps: int = 10

    def __post_init__(self) -> None:
        check_grid(self.epsilons)
        if self.steps < 1:
            raise ValueError(f"{self.name} needs steps >= 1, got {self.steps}")

    def _attack(self) -> foolbox.attacks.base.Attack:
        raise NotImplementedError

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        _, clipped, success = self._attack()(
            _foolbox_model(model, x0), x0, labels, epsilons=list(self.epsilons))
        # success: [E, N]; clipped: E tensors [N, C, H, W]
        found = success.any(0)
        first = success.int().argmax(0)  # the smallest successful epsilon (0 where none)
        adversarial = torch.stack(clipped)[first, torch.arange(len(x0), device=x0.device)]
        grid = torch.tensor(self.epsilons, dtype=torch.float64, device=x0.device)
        return torch.where(found[:, None, None, None], adversarial, x0), found, grid[first]


@dataclass(frozen=True)
class PGD(_LinfIterative):
    """foolbox's `LinfPGD` (random start, step 0.01 / 0.3 of epsilon, 40 steps)."""

    name: ClassVar[str] = "pgd"
    steps: int = 40
    rel_stepsize: float = 0.01 / 0.3

    def _attack(self) -> foolbox.attacks.base.Attack:
        return foolbox.attacks.LinfPGD(rel_stepsize=self.rel_stepsize, steps=self.steps)


@dataclass(frozen=True)
class BIM(_LinfIterative):
    """foolbox's `LinfBasicIterativeAttack` (no random start, step 0.2 of epsilon, 10 steps)."""

    name: ClassVar[str] = "bim"
    steps: int = 10
    rel_stepsize: float = 0.2

    def _attack(self) -> foolbox.attacks.base.Attack:
        return foolbox.attacks.LinfBasicIterativeAttack(rel_stepsize=self.rel_stepsize,
                                                        steps=self.steps)


@dataclass(frozen=True)
class MIFGSM(_LinfIterative):
    """foolbox's `LinfMomentumIterativeFastGradientMethod` (Dong et al. 2018; no random start,
    step 0.2 of epsilon, 10 steps, momentum 1).

    Each step moves by the step size times the sign of the accumulated gradient `g <- momentum *
    g + sign(grad)`: foolbox accumulates the gradient's sign where Dong et al. accumulate the
    gradient divided by its L1 norm.
    """

    name: ClassVar[str] = "mifgsm"
    steps: int = 10
    rel_stepsize: float = 0.2
    momentum: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum < 0:
            raise ValueError(f"{self.name} needs momentum >= 0, got {self.momentum}")

    def _attack(self) -> foolbox.attacks.base.Attack:
        return foolbox.attacks.LinfMomentumIterativeFastGradientMethod(
            momentum=self.momentum, rel_stepsize=self.rel_stepsize, steps=self.steps)


@dataclass(frozen=True)
class CarliniWagner(_UnboundedL2):
    """foolbox's `L2CarliniWagnerAttack`; epsilon is the L2 distance of the adversarial.

    foolbox's defaults (10000 steps, 9 binary-search steps) take hours on a CPU; these defaults
    are a budget for 32x32 digits.
    """

    name: ClassVar[str] = "cw"
    binary_search_steps: int = 5
    steps: int = 200
    stepsize: float = 0.01
    confidence: float = 0.0
    initial_const: float = 0.1

    def _attack(self) -> foolbox.attacks.base.Attack:
        return foolbox.attacks.L2CarliniWagnerAttack(
            binary_search_steps=self.binary_search_steps, steps=self.steps,
            stepsize=self.stepsize, confidence=self.confidence, initial_const=self.initial_const)


# foolbox's attacks, in the order the study reports them
FOOLBOX_ATTACKS = (DeepFool, Boundary, PGD, BIM, MIFGSM, CarliniWagner)
