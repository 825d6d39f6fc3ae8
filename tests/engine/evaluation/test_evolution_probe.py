"""The distance-evolution probe: its variants, what it trains, what it reports."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import frmap.engine.evaluation.evolution_probe as probe
from frmap.engine.detectors import EvolutionConfig, KNNConfig, KNNDetector, default_layers
from frmap.engine.evaluation.comparison import ComparisonConfig
from frmap.engine.evaluation.comparison.data import prepare
from frmap.engine.evaluation.evolution_probe import DEFAULT, evolution_variants, probe_evolution
from frmap.engine.evaluation.subject import Subject
from frmap.engine.models.digits import load_digits_model

from helpers import digits_split

LAYERS = ("a", "b", "c")


def test_each_variant_changes_one_setting():
    base = EvolutionConfig(LAYERS, epochs=7)
    variants = evolution_variants(base)
    assert variants[DEFAULT] == base
    assert set(variants) == {DEFAULT, "centroid", "euclidean", "unstandardised",
                             "class order", "only a", "only b", "only c"}
    for name, variant in variants.items():
        changed = {f.name for f in fields(base)
                   if getattr(base, f.name) != getattr(variant, f.name)}
        expected = {DEFAULT: set(), "centroid": {"reference"}, "euclidean": {"embedding"},
                    "unstandardised": {"standardise"},
                    "class order": {"predicted_first"}}.get(name, {"layers"})
        assert changed == expected, name
    assert variants["only b"].layers == ("b",)


def test_probe_trains_every_variant_and_seed_and_reports_their_aucs(tmp_path, monkeypatch,
                                                                     module_one_thread):
    model = load_digits_model()
    layers = default_layers(model)
    knn = KNNConfig(layers[-1], components=16, k=10)
    config = ComparisonConfig(attacks=("fgsm", "deepfool"), attack_limit=24, train_limit=30,
                              knn=knn, evolution=EvolutionConfig(layers, epochs=2))
    trained = []
    train_network = probe.train_network

    def record(data, variant, *args, **kwargs):
        trained.append(variant)
        detector = train_network(data, variant, *args, **kwargs)
        trained_scores.append(data.scores(detector.score))
        return detector

    trained_scores: list[dict[str, np.ndarray]] = []
    monkeypatch.setattr(probe, "train_network", record)
    splits = {k: digits_split(k) for k in ("train", "calibration", "test")}
    rows = probe_evolution(model, **splits, out_dir=tmp_path, config=config, seeds=(0, 1),
                           networks=("mlp",))

    variants = evolution_variants(config.evolution)
    assert trained == [replace(v, network="mlp", seed=s) for v in variants.values()
                       for s in (0, 1)]
    assert [(r.variant, r.network) for r in rows] == [("knn", "")] + [
        (v, "mlp") for v in variants]
    assert json.loads((tmp_path / "evolution-probe.json").read_text()) == [asdict(r) for r in rows]

    # each row: the mean over seeds of the mean over attacks of scikit-learn's AUC
    def mean_auc(scores):
        clean = scores["clean"]
        return np.mean([roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(scores[a]))],
                                      np.r_[clean, scores[a]]) for a in config.attacks])

    aucs = np.array([mean_auc(s) for s in trained_scores]).reshape(len(rows) - 1, 2)
    np.testing.assert_allclose([r.auc for r in rows[1:]], aucs.mean(1), atol=1e-12)
    np.testing.assert_allclose([r.spread for r in rows[1:]], aucs.std(1), atol=1e-12)
    assert all(1 <= r.best_epoch <= 2 and 0 <= r.validation_auc <= 1 for r in rows[1:])

    # the kNN row: fitted on the comparison's fit images, scored on its test sets
    data = prepare(Subject.of(model, None), splits["train"], splits["calibration"],
                   splits["test"], tmp_path, config, layers, progress=False)
    detector = KNNDetector.fit(data.fit[0].features, data.labels, knn)
    assert rows[0].auc == pytest.approx(mean_auc(data.scores(
        detector.score)), abs=1e-12)


def test_probe_needs_a_seed(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        probe_evolution(load_digits_model(), train=digits_split("train"),
                        calibration=digits_split("calibration"), test=digits_split("test"),
                        out_dir=tmp_path, seeds=())
