"""The comparison's detectors, each fitted on the fit images (uncalibrated)."""

from __future__ import annotations

from dataclasses import replace

from frmap.engine.detectors import (
    Detector,
    DistanceEvolutionDetector,
    EntropyDetector,
    EvolutionConfig,
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    LIDDetector,
    MahalanobisDetector,
)
from frmap.engine.evaluation.comparison.config import ComparisonConfig
from frmap.engine.evaluation.comparison.data import ComparisonData, examples_of
from frmap.engine.evaluation.subject import Subject
from frmap.engine.models import torch_settings

NETWORKS = {"distance-lstm": "lstm", "distance-mlp": "mlp"}


def train_network(data: ComparisonData, config: EvolutionConfig, identity: str, progress: bool,
                  *, without: str | None = None) -> DistanceEvolutionDetector:
    """A distance-evolution detector trained on the fit images (less one attack's)."""
    # one thread: the networks are too small to gain from more (they lose a lot on a busy
    # machine), and their weights then do not depend on the machine's thread count
    with torch_settings(1):
        return DistanceEvolutionDetector.fit(
            data.fit[0].features, data.labels,
            examples_of([p for p in data.fit if p.attack != without]),
            examples_of([p for p in data.validation if p.attack != without]),
            config, model=identity, progress=progress)


def make_detector(name: str, subject: Subject, data: ComparisonData, config: ComparisonConfig,
                  knn: KNNConfig, evolution: EvolutionConfig, training: dict, progress: bool
                  ) -> Detector:
    """The detector `name`, fitted on the fit images (uncalibrated)."""
    if name == "entropy":
        return EntropyDetector(config.footprint, config.rule, config.target, subject.identity,
                               precision=config.precision)
    if name == "squeeze":
        return FeatureSqueezer(config.squeeze, subject.identity)
    if name == "knn":
        return KNNDetector.fit(data.fit[0].features, data.labels, knn, model=subject.identity)
    if name == "lid":
        return LIDDetector.fit(examples_of(data.fit), config.lid, model=subject.identity)
    if name == "mahalanobis":
        detector = MahalanobisDetector.fit(data.fit[0].features, data.labels,
                                           examples_of(data.fit), config.mahalanobis,
                                           model=subject.identity)
        if config.mahalanobis.noise == 0:
            return detector
        return detector.with_combination(examples_of(
            [replace(p, screen=replace(p.screen, features=detector.scored_features(p.screen)))
             for p in data.fit]))
    detector = train_network(data, replace(evolution, network=NETWORKS[name]),
                             subject.identity, progress)
    training[name] = detector.report
    return detector
