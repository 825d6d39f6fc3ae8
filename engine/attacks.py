"""The five attacks of the detection study on classifiers taking images in [0, 1].

`run_attack(attack, model, images, labels)` attacks the correctly classified images only and
keeps an adversarial only where the model now predicts another class. The attacks are frozen
configs:

- `FGSM` (Linf) and `GradientAttack` (L2): one step along the loss gradient, with each image's
  smallest successful epsilon on a grid. The gradient does not depend on epsilon, so it is
  computed once; epsilon is then bisected over the sorted grid with forward passes only. The
  candidates repeat foolbox 3's arithmetic (`LinfFastGradientAttack` / `L2FastGradientAttack`
  followed by its epsilon clipping) operation by operation, so they are bitwise foolbox's; where
  success grows monotonically with epsilon (it does on the digits), the minimal epsilon is the
  one foolbox's own sweep over the same grid finds.
- `OnePixel`: differential evolution over one pixel's position and values (Su et al. 2019).
- `DeepFool` (`foolbox.attacks.L2DeepFoolAttack`) and `Boundary` (`foolbox.attacks.BoundaryAttack`
  started from `LinearSearchBlendedUniformNoiseAttack`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .predict import predict

if TYPE_CHECKING:
    import foolbox

_BATCH = 256
_CANDIDATE_BATCH = 2048

LINF_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 0.5, 151)[1:])
L2_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 10.0, 151)[1:])

# (adversarial [N, ...], found [N] bool, epsilon [N] float64)
Perturbation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (x0, direction, epsilon [N]) -> the perturbed images
Candidates = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def _per_image(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).square().sum(1).sqrt()


def _l2_clip(p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # foolbox: p * min(1, eps / max(||p||, 1e-12)); foolbox divides a Python float by a tensor,
    # which torch evaluates as reciprocal(norm) * eps, so the same is done here.
    factor = torch.clamp(_l2_norms(p).clamp_min(1e-12).reciprocal() * eps, max=1.0)
    return _per_image(factor, p.ndim) * p


def _linf_candidates(x0: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """foolbox's FGSM step: x0 + eps * sign(g), projected, clipped to [0, 1], clipped again."""
    e = _per_image(eps, x0.ndim)
    x = x0 + e * direction
    x = (x0 + torch.clamp(x - x0, -e, e)).clamp(0.0, 1.0)
    return x0 + torch.clamp(x - x0, -e, e)


def _l2_candidates(x0: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """foolbox's L2 step: x0 + eps * g / ||g||, projected, clipped to [0, 1], clipped again."""
    x = x0 + _per_image(eps, x0.ndim) * direction
    x = (x0 + _l2_clip(x - x0, eps)).clamp(0.0, 1.0)
    return x0 + _l2_clip(x - x0, eps)


def _loss_gradient(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    grads = []
    for i in range(0, len(x0), _BATCH):
        x = x0[i : i + _BATCH].clone().requires_grad_()
        with torch.enable_grad():
            F.cross_entropy(model(x), labels[i : i + _BATCH], reduction="none").sum().backward()
        grads.append(x.grad)
    return torch.cat(grads)


def _misclassified(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return predict(model, x, _BATCH)[0] != labels


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
    adversarial = torch.where(_per_image(found, x0.ndim), candidates(x0, direction, eps), x0)
    return adversarial, found, eps.double()


def _check_grid(epsilons: tuple[float, ...]) -> None:
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
        _check_grid(self.epsilons)

    def _step(self, grad: torch.Tensor) -> tuple[torch.Tensor, Candidates]:
        raise NotImplementedError

    def _perturb(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        rng: np.random.Generator,
        progress: bool,
    ) -> Perturbation:
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
        norms = _l2_norms(grad).clamp_min(1e-12).reciprocal()
        return grad * _per_image(norms, grad.ndim), _l2_candidates


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
    """Copies of `x0[which]`, each with one pixel set: `pixels` rows are (row, col, one value
    per channel), positions in [0, H] x [0, W] and floored to a pixel index."""
    h, w = x0.shape[-2:]
    images = x0[torch.from_numpy(which).to(x0.device)].clone()
    rows = torch.from_numpy(np.minimum(pixels[:, 0], h - 1).astype(np.int64)).to(x0.device)
    cols = torch.from_numpy(np.minimum(pixels[:, 1], w - 1).astype(np.int64)).to(x0.device)
    values = torch.from_numpy(pixels[:, 2:]).to(x0.device, x0.dtype)
    images[torch.arange(len(images), device=x0.device), :, rows, cols] = values
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
    """One-pixel attack: differential evolution (DE/rand/1, no crossover) over one pixel.

    Each candidate is (row, col, one value per channel); the initial population spreads
    uniformly over the pixels and over [0, 1]. A trial `a + mutation * (b - c)` from three
    other members replaces its member when it lowers the true-class probability (the
    fitness). An image stops evolving once its best candidate's true-class probability is
    below `stop_probability`; otherwise the best candidate is kept when the generations are
    spent. Su et al. (2019) used a population of 400 and 100 generations; the defaults here
    are a budget for 32x32 digits on a CPU.
    """

    name: ClassVar[str] = "one_pixel"
    population: int = 40
    generations: int = 10
    mutation: float = 0.5
    stop_probability: float = 0.05

    def __post_init__(self) -> None:
        if self.population < 4 or self.generations < 0:
            raise ValueError("one-pixel attack needs population >= 4 and generations >= 0")
        if not (0 < self.mutation <= 2 and 0 < self.stop_probability < 1):
            raise ValueError("one-pixel attack needs 0 < mutation <= 2, 0 < stop_probability < 1")

    def _perturb(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        rng: np.random.Generator,
        progress: bool,
    ) -> Perturbation:
        n, c, h, w = x0.shape
        low = np.zeros(2 + c)
        high = np.array([h, w] + [1.0] * c)
        pop = rng.uniform(low, high, size=(n, self.population, 2 + c))
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


def _l2_distance(adversarial: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return _l2_norms((adversarial - x0).double())


def _foolbox_model(model: nn.Module, x0: torch.Tensor) -> foolbox.PyTorchModel:
    import foolbox

    return foolbox.PyTorchModel(model, bounds=(0, 1), device=x0.device)


@dataclass(frozen=True)
class DeepFool:
    """foolbox's `L2DeepFoolAttack` (logits loss) over the `candidates` most likely classes."""

    name: ClassVar[str] = "deepfool"
    steps: int = 50
    candidates: int = 10
    overshoot: float = 0.02

    def _perturb(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        rng: np.random.Generator,
        progress: bool,
    ) -> Perturbation:
        import foolbox

        attack = foolbox.attacks.L2DeepFoolAttack(
            steps=self.steps, candidates=self.candidates, overshoot=self.overshoot
        )
        _, adversarial, found = attack(_foolbox_model(model, x0), x0, labels, epsilons=None)
        return adversarial, found, _l2_distance(adversarial, x0)


@dataclass(frozen=True)
class Boundary:
    """foolbox's decision-based `BoundaryAttack` for `steps` steps.

    It starts from `LinearSearchBlendedUniformNoiseAttack` (`init_directions` uniform-noise
    draws, `init_steps` blending steps); images for which no start is found fail. The step
    sizes and the interval of the step-size adaptation differ from foolbox's defaults (0.01,
    0.01, 10) to make a short run count: on 31 digits after 1000 steps the median L2 distance
    is 3.9 with these and 11.1 with foolbox's.
    """

    name: ClassVar[str] = "boundary"
    steps: int = 1000
    spherical_step: float = 0.05
    source_step: float = 0.05
    update_stats_every_k: int = 2
    init_directions: int = 100
    init_steps: int = 50

    def _perturb(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        rng: np.random.Generator,
        progress: bool,
    ) -> Perturbation:
        import foolbox

        fmodel = _foolbox_model(model, x0)
        init = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack(
            directions=self.init_directions, steps=self.init_steps
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


Attack = FGSM | GradientAttack | OnePixel | DeepFool | Boundary
ATTACKS: dict[str, type[Attack]] = {
    a.name: a for a in (FGSM, GradientAttack, OnePixel, DeepFool, Boundary)
}


def make_attack(name: str) -> Attack:
    """The attack called `name` (one of `ATTACKS`) with its default settings."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name]()


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


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
            classes = model(images[:1].to(_device(model), torch.float32)).shape[-1]
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
    device = _device(model)
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    with _frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        clean, clean_probs = predict(model, x, _BATCH)
        attacked = clean == y
        adversarial, found = x.clone(), torch.zeros_like(attacked)
        epsilon = torch.full((len(x),), math.nan, dtype=torch.float64, device=device)
        if attacked.any():
            rng = np.random.default_rng(seed)
            adv, hit, eps = attack._perturb(model, x[attacked], y[attacked], rng, progress)
            adversarial[attacked], found[attacked], epsilon[attacked] = adv, hit, eps.to(device)
        predicted, probs = predict(model, adversarial, _BATCH)
    success = attacked & found & (predicted != y)
    keep = success[:, None]
    probs = torch.where(keep, probs, clean_probs)
    predicted = torch.where(success, predicted, clean)
    return AttackResult(
        attacked=attacked.cpu(),
        success=success.cpu(),
        adversarial=torch.where(_per_image(success, x.ndim), adversarial, x).cpu(),
        adv_labels=predicted.cpu(),
        true_confidence=probs.gather(1, y[:, None])[:, 0].cpu(),
        adv_confidence=probs.gather(1, predicted[:, None])[:, 0].cpu(),
        epsilon=torch.where(success, epsilon, math.nan).cpu(),
    )
