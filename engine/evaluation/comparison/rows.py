"""The comparison's rows: each detector's scores turned into one evaluation per attack, the
per-layer and unseen-attack rows, and what the score combinations are fitted on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from frmap.engine.detectors import (
    CLEAN,
    Detector,
    EvolutionConfig,
    KNNConfig,
    KNNDetector,
    LIDDetector,
    MahalanobisDetector,
)
from frmap.engine.evaluation.comparison.config import ComparisonConfig
from frmap.engine.evaluation.comparison.data import ComparisonData, Part
from frmap.engine.evaluation.comparison.detectors import NETWORKS, train_network
from frmap.engine.evaluation.metrics import AttackEvaluation, evaluate_attack
from frmap.engine.evaluation.subject import Subject


def attack_rows(name: str, scores: dict[str, np.ndarray], attacks: Sequence[str],
                fpr: float) -> list[AttackEvaluation]:
    """`name`'s row on each attack: thresholds from the calibration scores, metrics on the clean
    test scores."""
    return [evaluate_attack(scores["calibration"], scores["clean"], scores[a], detector=name,
                            attack=a, operating_fpr=fpr) for a in attacks]


def per_layer_rows(data: ComparisonData, layers: Sequence[str], knn: KNNConfig,
                   subject: Subject, config: ComparisonConfig, detectors: dict[str, Detector]
                   ) -> list[AttackEvaluation]:
    """kNN, Mahalanobis and LID on each feature layer alone ("knn:<layer>", ...)."""
    rows = []
    if "knn" in detectors:
        for layer in layers:
            detector = KNNDetector.fit(data.fit[0].features, data.labels,
                                       replace(knn, layer=layer), model=subject.identity)
            rows += attack_rows(f"knn:{layer}", data.scores(detector.score), data.attacks,
                                config.operating_fpr)
    for name, detector in detectors.items():
        if isinstance(detector, MahalanobisDetector | LIDDetector):
            scores = data.scores(lambda p, d=detector: d.layer_scores(d.scored_features(p)))
            for i, layer in enumerate(detector.layers):
                rows += attack_rows(f"{name}:{layer}", {k: v[:, i] for k, v in scores.items()},
                                    data.attacks, config.operating_fpr)
    return rows


def best_layers(per_layer: Sequence[AttackEvaluation]) -> dict[str, str]:
    """For each detector of the per-layer rows ("<detector>:<layer>"), the layer with the best
    mean AUC over the measured rows."""
    aucs: dict[str, dict[str, list[float]]] = {}
    for r in per_layer:
        if r.measured:
            name, layer = r.detector.split(":", 1)
            aucs.setdefault(name, {}).setdefault(layer, []).append(r.auc)
    return {name: max(layers, key=lambda k, a=layers: np.mean(a[k]))
            for name, layers in aucs.items()}


def unseen_rows(data: ComparisonData, evolution: EvolutionConfig, identity: str,
                config: ComparisonConfig, training: dict, progress: bool
                ) -> list[AttackEvaluation]:
    """Each distance-evolution network trained without one attack and tested on it."""
    trained_on = sorted({p.attack for p in data.fit} - {CLEAN})
    left_out = [a for a in data.attacks if a in trained_on] if len(trained_on) > 1 else []
    rows = []
    for name in (d for d in config.detectors if d in NETWORKS):
        for attack in left_out:
            detector = train_network(data, replace(evolution, network=NETWORKS[name]),
                                     identity, progress, without=attack)
            training[f"{name} unseen:{attack}"] = detector.report
            rows += attack_rows(f"{name} unseen", data.scores(detector.score), [attack],
                                config.operating_fpr)
    return rows


def combiner_inputs(detectors: dict[str, Detector], combiner: Sequence[Part]
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The detectors' scores of the combiner images, and which images are adversarial: what
    the combinations are fitted on (`Combiner.fit`, which raises ValueError where the combiner
    images lack clean or adversarial versions)."""
    scores = {name: np.concatenate([d.score(p.screen) for p in combiner])
              for name, d in detectors.items()}
    adversarial = np.concatenate([np.full(len(p.image), p.attack != CLEAN) for p in combiner])
    return scores, adversarial
