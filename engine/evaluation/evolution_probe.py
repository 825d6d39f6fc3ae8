"""Why distance evolution trails kNN: its networks under variants, on the comparison's sets.

`probe_evolution` prepares the image sets `compare_detectors` uses (the same resumable
adversarial sets under `out_dir`, the same division of the train images), then trains each
network of each variant of `evolution_variants` on the fit images, several seeds each, scores
the test sets and reports the mean over the measured attacks of the test AUC, beside kNN on the
same sets. The variants change one thing each from the default: the class references
(centroid), the embedding (Euclidean), the per-layer standardisation (off), the order of the
classes (the predicted one first or not), the layers (each one alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frmap.engine.data.files import write_json
from frmap.engine.detectors import EvolutionConfig, KNNConfig, KNNDetector, default_layers
from frmap.engine.evaluation.comparison import ComparisonConfig
from frmap.engine.evaluation.comparison.data import ComparisonData, Scorer, prepare
from frmap.engine.evaluation.comparison.detectors import train_network
from frmap.engine.evaluation.comparison.rows import attack_rows
from frmap.engine.evaluation.subject import Subject

DEFAULT = "default"


@dataclass(frozen=True)
class ProbeRow:
    """One detector variant over the seeds.

    Attributes:
        variant: `DEFAULT`, what the variant changes, or "knn" (the reference row).
        network: "lstm", "mlp", or "" for kNN.
        auc: the mean over seeds of the mean test AUC over the measured attacks.
        spread: the standard deviation of that mean over the seeds.
        validation_auc: the mean over seeds of the kept epoch's mean validation AUC (None for
            kNN).
        best_epoch: the mean over seeds of the kept epoch (None for kNN).
    """

    variant: str
    network: str
    auc: float
    spread: float
    validation_auc: float | None
    best_epoch: float | None


def evolution_variants(base: EvolutionConfig) -> dict[str, EvolutionConfig]:
    """`base` (`DEFAULT`) and one variant of it per changed setting ("class order" flips
    `predicted_first`)."""
    return {DEFAULT: base, "centroid": replace(base, reference="centroid"),
            "euclidean": replace(base, embedding="euclidean"),
            "unstandardised": replace(base, standardise=False),
            "class order": replace(base, predicted_first=not base.predicted_first),
            **{f"only {layer}": replace(base, layers=(layer,)) for layer in base.layers}}


def _mean_auc(name: str, data: ComparisonData, score: Scorer, config: ComparisonConfig
              ) -> float:
    """The mean AUC over the measured attacks of one scorer."""
    rows = attack_rows(name, data.scores(score), data.attacks, config.operating_fpr)
    return float(np.mean([r.auc for r in rows if r.measured]))


def probe_evolution(model: nn.Module, *, train: tuple[torch.Tensor, torch.Tensor],
                    calibration: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], out_dir: str | Path,
                    config: ComparisonConfig | None = None,
                    seeds: Sequence[int] = (0, 1, 2), networks: Sequence[str] = ("lstm", "mlp"),
                    progress: bool = False) -> list[ProbeRow]:
    """Measure every variant (see the module docstring); writes `out_dir/evolution-probe.json`.

    Args:
        model, train, calibration, test: as for `compare_detectors`.
        config: the sets, the attacks, the seed of the division and the networks' base
            settings (`config.evolution`, None: the defaults on the feature layers); its
            detectors are ignored. None: the defaults.
        seeds: the networks' seeds.
        networks: "lstm" and/or "mlp".

    Raises:
        ValueError: too few images or adversarials, or no seed.
    """
    if not seeds:
        raise ValueError("the probe needs at least one seed")
    config = config or ComparisonConfig()
    out = Path(out_dir)
    subject = Subject.of(model, config.preprocess)
    layers = config.layers or default_layers(subject.classifier)
    knn_config = config.knn or KNNConfig(layers[-1])
    base = config.evolution or EvolutionConfig(layers)
    collected = tuple(dict.fromkeys((*layers, *base.layers, knn_config.layer)))
    data = prepare(subject, train, calibration, test, out, config, collected, progress=progress)
    knn = KNNDetector.fit(data.fit[0].features, data.labels, knn_config, model=subject.identity)
    rows = [ProbeRow("knn", "", _mean_auc("knn", data, knn.score, config), 0.0, None, None)]
    for name, variant in evolution_variants(base).items():
        for network in networks:
            runs = []
            for seed in seeds:
                detector = train_network(data, replace(variant, network=network, seed=seed),
                                         subject.identity, progress)
                runs.append((_mean_auc(name, data, detector.score, config),
                             np.mean(list(detector.report.validation_auc.values())),
                             detector.report.best_epoch))
            auc, validation, epoch = np.array(runs).T
            rows.append(ProbeRow(name, network, float(auc.mean()), float(auc.std()),
                                 float(validation.mean()), float(epoch.mean())))
    write_json(out / "evolution-probe.json", [asdict(r) for r in rows])
    return rows
