"""The comparison's image sets: the adversarial sets crafted, the features taken, and the
train images divided by role (fit, validation, combiner), no source image having two roles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from frmap.engine.attacks import AdversarialSet, AttackStats, attack_stats
from frmap.engine.detectors import CLEAN, Examples, Features
from frmap.engine.detectors.screen_pass import Needs, PassRunner, ScreenPass
from frmap.engine.evaluation.comparison.config import ComparisonConfig
from frmap.engine.evaluation.subject import Subject


@dataclass(frozen=True)
class Part:
    """Versions made one way (clean, or by one attack) of some images of one split.

    Attributes:
        attack: "clean" or the attack's name.
        screen: the pass over the versions: their images, layer features and logits, and, once
            `ComparisonData.screened`, everything the detectors score.
        image: `[N]` the index of each version's source image in its split.
    """

    attack: str
    screen: ScreenPass
    image: np.ndarray

    @property
    def images(self) -> torch.Tensor:
        """`[N, C, H, W]` the versions."""
        return self.screen.images

    @property
    def features(self) -> Features:
        return self.screen.features

    def take(self, mask: np.ndarray) -> Part:
        return Part(self.attack, self.screen.take(mask), self.image[mask])


Scorer = Callable[[ScreenPass], np.ndarray]


@dataclass(frozen=True)
class ComparisonData:
    """Every image set of a comparison, by role; no source image has two roles.

    Attributes:
        fit: the clean fit images first, then their adversarial versions: what the detectors
            learn from.
        validation: the networks' epoch choice; combiner: the score combination's fit.
        evaluated: "calibration" (clean), "clean" (test) and one entry per attack (test).
        labels: `[len(fit[0].image)]` the classes of the clean fit images.
        ids: train image indices by role ("fit", "validation", "combiner").
        attack_stats, train_attack_stats: the statistics of the test and train sets.
    """

    fit: list[Part]
    validation: list[Part]
    combiner: list[Part]
    evaluated: dict[str, Part]
    labels: np.ndarray
    ids: dict[str, np.ndarray]
    attack_stats: list[AttackStats]
    train_attack_stats: list[AttackStats]

    @property
    def attacks(self) -> list[str]:
        """The attacks with adversarial test images."""
        return [k for k in self.evaluated if k not in ("calibration", "clean")]

    def scores(self, scorer: Scorer) -> dict[str, np.ndarray]:
        """The scorer on every evaluated set's pass."""
        return {key: scorer(p.screen) for key, p in self.evaluated.items()}

    def screened(self, runner: PassRunner) -> ComparisonData:
        """The data with the evaluated and combiner parts' passes made by `runner` (what the
        detectors score; the fit and validation parts keep their features)."""
        def run(p: Part) -> Part:
            return replace(p, screen=runner.run(p.images))
        return replace(self, combiner=[run(p) for p in self.combiner],
                       evaluated={k: run(p) for k, p in self.evaluated.items()})


def _select(parts: Sequence[Part], ids: np.ndarray) -> list[Part]:
    """The versions of the source images `ids`, without empty parts."""
    chosen = [p.take(np.isin(p.image, ids)) for p in parts]
    return [p for p in chosen if len(p.image)]


def examples_of(parts: Sequence[Part]) -> Examples:
    """The parts' versions as detector examples."""
    return Examples.concat([Examples.of(p.features, p.attack, p.image) for p in parts])


def _divide(attacked: np.ndarray, correct: np.ndarray, config: ComparisonConfig
            ) -> dict[str, np.ndarray]:
    """Train image indices by role: combiner and validation images drawn from the attacked
    ones, fit images all other correctly classified ones."""
    order = np.random.default_rng(config.seed).permutation(attacked)
    n_comb = round(config.combiner_fraction * len(order))
    n_val = round(config.validation_fraction * len(order))
    if min(n_comb, n_val, len(order) - n_comb - n_val) < 1:
        raise ValueError(f"{len(order)} attacked train images are too few to divide into fit,"
                         " validation and combiner images")
    combiner, validation = np.sort(order[:n_comb]), np.sort(order[n_comb:n_comb + n_val])
    fit = np.setdiff1d(correct, np.r_[combiner, validation])
    return {"fit": fit, "validation": validation, "combiner": combiner}


class Featurizer:
    """Image sets with their layer features, from one forward pass each."""

    def __init__(self, subject: Subject, layers: tuple[str, ...], batch_size: int) -> None:
        self.runner = PassRunner(subject.model, subject.classifier, Needs(layers=layers),
                                 preprocess=subject.preprocess, batch_size=batch_size)

    def part(self, attack: str, images: torch.Tensor, image: np.ndarray) -> Part:
        return Part(attack, self.runner.run(images), image)

    def clean(self, split: tuple[torch.Tensor, torch.Tensor]) -> Part:
        """The correctly classified images of a split."""
        images, labels = split
        everything = self.part(CLEAN, images, np.arange(len(images)))
        return everything.take(everything.features.predictions == labels.numpy())

    def adversarial(self, sets: dict[str, AdversarialSet]) -> list[Part]:
        return [self.part(s.attack, s.images, s.index.numpy()) for s in sets.values()
                if len(s.index)]


def prepare(subject: Subject, train: tuple[torch.Tensor, torch.Tensor],
            calibration: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor], out: Path, config: ComparisonConfig,
            layers: tuple[str, ...], *, progress: bool) -> ComparisonData:
    """Craft the adversarial sets, take the features, and divide the images by role.

    Raises:
        ValueError: no successful adversarial, or too few attacked train images to divide.
    """
    featurizer = Featurizer(subject, layers, config.batch_size)
    train_clean, cal, test_clean = (featurizer.clean(s) for s in (train, calibration, test))
    train_sets, test_sets = (
        subject.adversarial_sets(config.attacks, split[0][:limit], split[1][:limit],
                                 out / folder, seed=config.seed, progress=progress)
        for split, limit, folder in ((train, config.train_limit, "adversarial-train"),
                                     (test, config.attack_limit, "adversarial")))
    train_adv, test_adv = featurizer.adversarial(train_sets), featurizer.adversarial(test_sets)
    if not test_adv or not train_adv:
        raise ValueError("no attack produced a successful adversarial: nothing to compare")
    n_attacked = len(train[0][:config.train_limit])
    ids = _divide(train_clean.image[train_clean.image < n_attacked], train_clean.image, config)
    fit, validation, combiner = (_select([train_clean, *train_adv], ids[role])
                                 for role in ("fit", "validation", "combiner"))
    return ComparisonData(
        fit=fit, validation=validation, combiner=combiner,
        evaluated={"calibration": cal, "clean": test_clean, **{p.attack: p for p in test_adv}},
        labels=train[1].numpy()[fit[0].image], ids=ids,
        attack_stats=[attack_stats(s) for s in test_sets.values()],
        train_attack_stats=[attack_stats(s) for s in train_sets.values()],
    )
