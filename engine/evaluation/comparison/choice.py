"""The screener the comparison saves: every detector set's mean AUC, and the best set within a
cost budget, calibrated."""

from __future__ import annotations

import numpy as np

from frmap.engine.detectors import Detector
from frmap.engine.evaluation.comparison.config import ComparisonConfig
from frmap.engine.evaluation.comparison.data import ComparisonData
from frmap.engine.evaluation.comparison.rows import attack_rows
from frmap.engine.evaluation.costs import cheapest_within, detector_sets, mean_of
from frmap.engine.evaluation.subject import Subject
from frmap.engine.screening import Combiner, Screener

DetectorSet = tuple[str, ...]


def candidate_sets(detectors: dict[str, Detector], combiner: Combiner,
                   combined_on: tuple[dict[str, np.ndarray], np.ndarray],
                   scores: dict[str, dict[str, np.ndarray]], data: ComparisonData,
                   config: ComparisonConfig
                   ) -> tuple[dict[DetectorSet, float], dict[DetectorSet, Combiner | None]]:
    """Every detector set's mean AUC over the measured attacks (all attacks where none is), and
    its combination: none for one detector alone, else a logistic regression fitted on the
    combiner images' scores `combined_on` (`combiner_inputs`; `combiner` for all of them)."""
    fpr = config.operating_fpr
    rows = [r for n in detectors for r in attack_rows(n, scores[n], data.attacks, fpr)]
    measured = {r.attack for r in rows if r.measured} or set(data.attacks)
    combiners: dict[DetectorSet, Combiner | None] = {(name,): None for name in detectors}
    fitted_on, adversarial = combined_on
    aucs = {}
    for names in detector_sets(list(detectors)):
        if len(names) == 1:
            own = scores[names[0]]
        else:
            combiners[names] = combiner if len(names) == len(detectors) else \
                Combiner.fit({n: fitted_on[n] for n in names}, adversarial)
            own = {key: combiners[names]({n: scores[n][key] for n in names})
                   for key in data.evaluated}
        aucs[names] = mean_of([r.auc for r in attack_rows("", own, data.attacks, fpr)
                               if r.attack in measured])
    return aucs, combiners


def best_screener(subject: Subject, detectors: dict[str, Detector],
                  combiners: dict[DetectorSet, Combiner | None], aucs: dict[DetectorSet, float],
                  scores: dict[str, dict[str, np.ndarray]],
                  costs: dict[str, float], config: ComparisonConfig) -> Screener:
    """The set with the best mean AUC among those costing at most `config.max_cost` forward
    passes (`candidate_sets`), as a calibrated screener."""
    best = cheapest_within(aucs, costs, config.max_cost)
    screener = Screener(subject.model, {n: detectors[n] for n in best},
                        preprocess=config.preprocess, combiner=combiners[best],
                        batch_size=config.batch_size)
    return screener.calibrate_scores({n: scores[n]["calibration"] for n in best},
                                     config.operating_fpr)
