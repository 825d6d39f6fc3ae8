"""The adaptive sets of the comparison: PGD against each differentiable detector, against all
of them at once, and without a detector term (see `frmap.engine.evaluation.adaptive`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from frmap.engine.detectors import (
    Detector,
    EntropyDetector,
    FeatureSqueezer,
    KNNDetector,
    LIDDetector,
    MahalanobisDetector,
)
from frmap.engine.evaluation.adaptive import (
    ENTROPY_SURROGATE,
    Surrogate,
    adaptive_pgd,
    entropy_surrogate,
    knn_surrogate,
    lid_surrogate,
    mahalanobis_surrogate,
    squeeze_surrogate,
    standardised,
    summed,
)
from frmap.engine.evaluation.comparison.config import ComparisonConfig
from frmap.engine.evaluation.comparison.data import ComparisonData, Featurizer
from frmap.engine.evaluation.subject import Subject


def surrogates(detectors: dict[str, Detector], subject: Subject) -> dict[str, Surrogate]:
    """The differentiable surrogates of the detectors that have one (`adaptive`)."""
    makers = {KNNDetector: knn_surrogate, MahalanobisDetector: mahalanobis_surrogate,
              LIDDetector: lid_surrogate, FeatureSqueezer: squeeze_surrogate,
              EntropyDetector: entropy_surrogate}
    return {name: makers[type(d)](subject.classifier, d) for name, d in detectors.items()
            if type(d) in makers and not (isinstance(d, EntropyDetector)
                                          and (d.rule, d.target) != ENTROPY_SURROGATE)}


def with_adaptive(data: ComparisonData, subject: Subject, labels: torch.Tensor,
                  surrogates: dict[str, Surrogate], config: ComparisonConfig,
                  layers: tuple[str, ...]) -> ComparisonData:
    """`data` with the adaptive sets among the evaluated ones (see the package docstring)."""
    clean = data.evaluated["clean"]
    clean = clean.take(np.arange(len(clean.image)) < (config.attack_limit or len(clean.image)))
    y = labels[torch.from_numpy(clean.image)]
    calibration = data.evaluated["calibration"].images
    attackers = {name: standardised(s, calibration, config.batch_size)
                 for name, s in surrogates.items()}
    if len(attackers) > 1:
        attackers["all"] = summed(list(attackers.values()))
    featurizer = Featurizer(subject, layers, config.batch_size)
    evaluated = dict(data.evaluated)
    for name, surrogate in {"fixed": None, **attackers}.items():
        adversarial, found = adaptive_pgd(subject.classifier, surrogate, clean.images, y,
                                          config.adaptive, config.batch_size)
        key = "pgd-fixed" if surrogate is None else f"adaptive-{name}"
        if found.any():
            evaluated[key] = featurizer.part(key, adversarial[found], clean.image[found.numpy()])
    return replace(data, evaluated=evaluated)
