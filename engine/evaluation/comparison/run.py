"""`compare_detectors`: every detector on the same adversarial sets (see the package
docstring)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from frmap.engine.data.files import write_json
from frmap.engine.detectors import (
    EvolutionConfig,
    EvolutionTrainReport,
    KNNConfig,
    LIDConfig,
    MahalanobisConfig,
    default_layers,
)
from frmap.engine.detectors.screen_pass import Needs, PassRunner
from frmap.engine.evaluation.comparison.adaptive_sets import surrogates, with_adaptive
from frmap.engine.evaluation.comparison.choice import best_screener, candidate_sets
from frmap.engine.evaluation.comparison.config import COMBINED, DEFAULT_CONFIG, ComparisonConfig
from frmap.engine.evaluation.comparison.data import prepare
from frmap.engine.evaluation.comparison.detectors import make_detector
from frmap.engine.evaluation.comparison.files import write_files
from frmap.engine.evaluation.comparison.report import ComparisonReport
from frmap.engine.evaluation.comparison.rows import (
    attack_rows,
    best_layers,
    combiner_inputs,
    per_layer_rows,
    unseen_rows,
)
from frmap.engine.evaluation.costs import detector_costs, set_cost
from frmap.engine.evaluation.subject import Subject
from frmap.engine.screening import Combiner


def compare_detectors(
    model: nn.Module,
    *,
    train: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out_dir: str | Path,
    config: ComparisonConfig = DEFAULT_CONFIG,
    screener_path: str | Path | None = None,
    progress: bool = False,
) -> ComparisonReport:
    """Run every detector of `config` on the same adversarial sets; see the package docstring.

    Args:
        model: classifier of [N, C, H, W] images in [0, 1] (ImageNet normalisation inside when
            `config.preprocess == "imagenet"`), C = 1 or 3.
        train, calibration, test: (images [N, C, H, W] in [0, 1], labels [N]) clean splits;
            only correctly classified images take part.
        out_dir: where the adversarial sets, the results and the figures go.
        config: see `ComparisonConfig`.
        screener_path: where to save the best detector set as a screener (`best_screener`),
            calibrated on the calibration split at `config.operating_fpr`; None: no screener.
        progress: show progress bars.

    Raises:
        ValueError: too few images or adversarials to train, combine or evaluate.
    """
    out = Path(out_dir)
    subject = Subject.of(model, config.preprocess)
    layers = config.layers or default_layers(subject.classifier)
    knn = config.knn or KNNConfig(layers[-1])
    evolution = config.evolution or EvolutionConfig(layers)
    config = replace(config, mahalanobis=config.mahalanobis or MahalanobisConfig(layers),
                     lid=config.lid or LIDConfig(layers))
    collected = tuple(dict.fromkeys((*layers, knn.layer, *evolution.layers,
                                     *config.mahalanobis.layers, *config.lid.layers)))
    data = prepare(subject, train, calibration, test, out, config, collected, progress=progress)

    training: dict[str, EvolutionTrainReport] = {}
    detectors = {name: make_detector(name, subject, data, config, knn, evolution, training,
                                     progress) for name in config.detectors}
    if config.adaptive is not None:
        data = with_adaptive(data, subject, test[1], surrogates(detectors, subject), config,
                              collected)
    data = data.screened(PassRunner(
        subject.model, subject.classifier,
        Needs.union([Needs(layers=collected), *(d.needs for d in detectors.values())]),
        preprocess=config.preprocess, batch_size=config.batch_size))
    scores = {name: data.scores(d.score) for name, d in detectors.items()}
    combined_on = combiner_inputs(detectors, data.combiner)
    combiner = Combiner.fit(*combined_on)
    scores[COMBINED] = {key: combiner({n: scores[n][key] for n in detectors})
                        for key in data.evaluated}
    weights = combiner.weight_of()
    results = [row for name, s in scores.items()
               for row in attack_rows(name, s, data.attacks, config.operating_fpr)]
    per_layer = per_layer_rows(data, layers, knn, subject, config, detectors)
    unseen = unseen_rows(data, evolution, subject.identity, config, training, progress)
    files = write_files(out, results, per_layer, unseen, scores, data.attacks)
    extra = detector_costs(subject, detectors,
                           data.evaluated["calibration"].images[:config.batch_size],
                           layers=collected)
    costs = {name: set_cost(extra, [name]) for name in detectors}
    costs[COMBINED] = set_cost(extra, list(detectors))
    aucs, combiners = candidate_sets(detectors, combiner, combined_on, scores, data, config)
    chosen: tuple[str, ...] = ()
    screener_cost = None
    if screener_path is not None:
        screener = best_screener(subject, detectors, combiners, aucs, scores, extra, config)
        files["screener"] = str(screener.save(screener_path))
        chosen = (*(["combined"] if screener.combiner else []), *screener.detectors)
        screener_cost = set_cost(extra, list(screener.detectors))
    images = {role: i.tolist() for role, i in data.ids.items()}
    images |= {"calibration": data.evaluated["calibration"].image.tolist(),
               "test": data.evaluated["clean"].image.tolist()}
    report = ComparisonReport(subject.identity, data.attack_stats, data.train_attack_stats,
                              results, per_layer, best_layers(per_layer), unseen, weights,
                              training, images, files, chosen, costs, screener_cost,
                              {"+".join(k): v for k, v in aucs.items()})
    write_json(out / "comparison-report.json", asdict(report))
    return report
