"""The one-pixel attack and its few-pixel variants: differential evolution over the positions
and values of k pixels (Su et al. 2019 attack with 1, 3 and 5 pixels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks.base import Perturbation

_CANDIDATE_BATCH = 2048


def _distinct_triples(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    """`[n, p, 3]` population indices, distinct from each other and from their member."""
    r = rng.integers(0, p, size=(n, p, 3))
    member = np.arange(p)[None, :, None]
    while True:
        bad = (r == member).any(2) | (r[..., 0] == r[..., 1]) | (r[..., 0] == r[..., 2])
        bad |= r[..., 1] == r[..., 2]
        if not bad.any():
            return r
        r[bad] = rng.integers(0, p, size=(int(bad.sum()), 3))


def _with_pixel(x0: torch.Tensor, which: np.ndarray, pixels: np.ndarray) -> torch.Tensor:
    """Copies of `x0[which]`, each with k pixels set: `pixels` rows are k times (row, col, one
    value per channel), positions in [0, H] x [0, W] and floored to a pixel index; where two
    coincide, the later one wins."""
    c, h, w = x0.shape[-3:]
    images = x0[torch.from_numpy(which).to(x0.device)].clone()
    at = torch.arange(len(images), device=x0.device)
    for pixel in pixels.reshape(len(pixels), -1, 2 + c).transpose(1, 0, 2):
        rows = torch.from_numpy(np.minimum(pixel[:, 0], h - 1).astype(np.int64)).to(x0.device)
        cols = torch.from_numpy(np.minimum(pixel[:, 1], w - 1).astype(np.int64)).to(x0.device)
        images[at, :, rows, cols] = torch.from_numpy(pixel[:, 2:]).to(x0.device, x0.dtype)
    return images


@torch.no_grad()
def _true_probability(
    model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, pixels: np.ndarray
) -> np.ndarray:
    """`[n, m]` true-class probability of each image with each of its `m` candidate pixels."""
    n, m, _ = pixels.shape
    which = np.repeat(np.arange(n), m)
    flat = pixels.reshape(n * m, -1)
    out = []
    for i in range(0, n * m, _CANDIDATE_BATCH):
        part = slice(i, i + _CANDIDATE_BATCH)
        probs = model(_with_pixel(x0, which[part], flat[part])).float().softmax(1)
        true = labels[torch.from_numpy(which[part]).to(labels.device)]
        out.append(probs.gather(1, true[:, None])[:, 0].cpu().numpy())
    return np.concatenate(out).reshape(n, m)


@dataclass(frozen=True)
class OnePixel:
    """One-pixel attack: differential evolution (DE/rand/1, no crossover) over `pixels` pixels.

    Each candidate is `pixels` times (row, col, one value per channel); the initial population
    spreads uniformly over the pixels and over [0, 1]. A trial `a + mutation * (b - c)` from three
    other members replaces its member when it lowers the true-class probability (the
    fitness). An image stops evolving once its best candidate's true-class probability is
    below `stop_probability`; otherwise the best candidate is kept when the generations are
    spent. Su et al. (2019) used a population of 400 and 100 generations; the defaults here
    are a budget for 32x32 digits on a CPU.
    """

    name: ClassVar[str] = "one_pixel"
    pixels: ClassVar[int] = 1
    population: int = 40
    generations: int = 10
    mutation: float = 0.5
    stop_probability: float = 0.05

    def __post_init__(self) -> None:
        if self.population < 4 or self.generations < 0:
            raise ValueError(f"{self.name} attack needs population >= 4 and generations >= 0")
        if not (0 < self.mutation <= 2 and 0 < self.stop_probability < 1):
            raise ValueError(
                f"{self.name} attack needs 0 < mutation <= 2 and 0 < stop_probability < 1")

    def perturb(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, progress: bool) -> Perturbation:
        n, c, h, w = x0.shape
        low = np.zeros((2 + c) * self.pixels)
        high = np.tile([h, w] + [1.0] * c, self.pixels).astype(np.float64)
        pop = rng.uniform(low, high, size=(n, self.population, len(low)))
        fitness = _true_probability(model, x0, labels, pop)
        for _ in tqdm(
            range(self.generations), desc="one-pixel", unit="gen", leave=False, disable=not progress
        ):
            active = np.flatnonzero(fitness.min(1) >= self.stop_probability)
            if len(active) == 0:
                break
            members = pop[active]
            r = _distinct_triples(rng, len(active), self.population)
            at = np.arange(len(active))[:, None]
            trial = members[at, r[..., 0]] + self.mutation * (
                members[at, r[..., 1]] - members[at, r[..., 2]]
            )
            trial = np.clip(trial, low, high)
            trial_fitness = _true_probability(model, x0[active], labels[active], trial)
            better = trial_fitness < fitness[active]
            pop[active] = np.where(better[..., None], trial, members)
            fitness[active] = np.where(better, trial_fitness, fitness[active])
        best = pop[np.arange(n), fitness.argmin(1)]
        adversarial = _with_pixel(x0, np.arange(n), best)
        changed = (adversarial != x0).flatten(2).any(1).sum(1)
        return adversarial, changed > 0, changed.double()


@dataclass(frozen=True)
class ThreePixel(OnePixel):
    """The one-pixel attack's differential evolution over 3 pixels."""

    name: ClassVar[str] = "three_pixel"
    pixels: ClassVar[int] = 3


@dataclass(frozen=True)
class FivePixel(OnePixel):
    """The one-pixel attack's differential evolution over 5 pixels."""

    name: ClassVar[str] = "five_pixel"
    pixels: ClassVar[int] = 5
