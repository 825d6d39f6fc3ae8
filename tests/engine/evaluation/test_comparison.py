"""The detector comparison on a tiny digits setting: rows, no leakage, files, the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import product

import numpy as np
import pytest

import frmap.engine.evaluation.comparison.run as comparison_run
from frmap.engine.detectors.distance_evolution import DistanceEvolutionDetector, EvolutionConfig
from frmap.engine.detectors.features import default_layers
from frmap.engine.detectors.knn import KNNConfig, KNNDetector
from frmap.engine.detectors.lid import LIDConfig, LIDDetector
from frmap.engine.detectors.mahalanobis import MahalanobisConfig, MahalanobisDetector
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.evaluation.adaptive import AdaptiveConfig
from frmap.engine.evaluation.comparison import (
    COMBINED,
    DETECTORS,
    ComparisonConfig,
    compare_detectors,
    comparison_table,
)
from frmap.engine.evaluation.comparison.rows import best_layers
from frmap.engine.evaluation.costs import cheapest_within, detector_sets, set_cost
from frmap.engine.evaluation.metrics import MIN_ADVERSARIALS, TOO_FEW, AttackEvaluation
from frmap.engine.evaluation.metrics import table as metrics_table
from frmap.engine.models.digits import load_digits_model
from frmap.engine.models.runtime import torch_settings
from frmap.engine.screening import Screener

from helpers import digits_split, frmap

ATTACKS = ("fgsm", "deepfool")
ADAPTIVE = ("pgd-fixed", *(f"adaptive-{d}" for d in ("entropy", "knn", "mahalanobis", "lid",
                                                     "squeeze", "all")))
EVALUATED = (*ATTACKS, *ADAPTIVE)
NETWORKS = ("distance-lstm", "distance-mlp")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One comparison of every detector, recording what each fit and combination was given."""
    model = load_digits_model()
    layers = default_layers(model)
    config = ComparisonConfig(
        attacks=ATTACKS, knn=KNNConfig(layers[-1], components=16, k=10),
        evolution=EvolutionConfig(layers, epochs=2), squeeze=DIGITS_SQUEEZERS, attack_limit=40,
        train_limit=60, lid=LIDConfig(layers, k=10, reference=100),
        adaptive=AdaptiveConfig(epsilon=0.15, steps=3, step=0.05),
        mahalanobis=MahalanobisConfig(layers, noise=0.002),
    )
    calls: dict[str, list] = {"knn": [], "network": [], "combiner": [], "layered": [],
                              "best": []}
    knn_fit = KNNDetector.fit.__func__
    network_fit = DistanceEvolutionDetector.fit.__func__
    mahalanobis_fit = MahalanobisDetector.fit.__func__
    lid_fit = LIDDetector.fit.__func__
    combine = comparison_run.combiner_inputs
    best = comparison_run.best_screener

    def record_mahalanobis(cls, clean, labels, examples, *args, **kwargs):
        calls["layered"].append((len(clean), examples))
        return mahalanobis_fit(cls, clean, labels, examples, *args, **kwargs)

    def record_lid(cls, examples, *args, **kwargs):
        calls["layered"].append((None, examples))
        return lid_fit(cls, examples, *args, **kwargs)

    def record_knn(cls, features, *args, **kwargs):
        calls["knn"].append(len(features))
        return knn_fit(cls, features, *args, **kwargs)

    def record_network(cls, reference, labels, train, validation, *args, **kwargs):
        calls["network"].append((len(reference), train, validation))
        return network_fit(cls, reference, labels, train, validation, *args, **kwargs)

    def record_combiner(detectors, parts):
        calls["combiner"].extend(parts)
        return combine(detectors, parts)

    def record_best(subject, detectors, combiners, aucs, scores, *args):
        calls["best"].append((detectors, combiners[tuple(detectors)], scores))
        return best(subject, detectors, combiners, aucs, scores, *args)

    out = tmp_path_factory.mktemp("comparison")
    with torch_settings(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(KNNDetector, "fit", classmethod(record_knn))
        mp.setattr(DistanceEvolutionDetector, "fit", classmethod(record_network))
        mp.setattr(MahalanobisDetector, "fit", classmethod(record_mahalanobis))
        mp.setattr(LIDDetector, "fit", classmethod(record_lid))
        mp.setattr(comparison_run, "combiner_inputs", record_combiner)
        mp.setattr(comparison_run, "best_screener", record_best)
        report = compare_detectors(
            model, train=digits_split("train"), calibration=digits_split("calibration"),
            test=digits_split("test"), out_dir=out, config=config, progress=False,
            screener_path=out / "screener.frmap",
        )
    return report, out, calls, layers


def test_one_row_per_detector_and_attack_plus_combined(run):
    report, *_ = run
    keys = [(r.detector, r.attack) for r in report.results]
    assert sorted(keys) == sorted(product((*DETECTORS, COMBINED), EVALUATED))
    assert set(report.combiner) == set(DETECTORS)
    test = report.images["test"]
    assert all(r.n_clean == len(test) and r.n_adversarial > 0 for r in report.results)
    assert all(0.0 <= r.auc <= 1.0 for r in report.results)


def test_per_layer_and_leave_one_attack_out_rows(run):
    report, _, _, layers = run
    assert sorted((r.detector, r.attack) for r in report.per_layer) == sorted(
        product((f"{d}:{layer}" for d in ("knn", "mahalanobis", "lid") for layer in layers),
                EVALUATED))
    assert set(report.best_layer) == {"knn", "mahalanobis", "lid"}
    assert set(report.best_layer.values()) <= set(layers)
    assert sorted((r.detector, r.attack) for r in report.unseen) == sorted(
        product((f"{n} unseen" for n in NETWORKS), ATTACKS))
    for name, attack in product(NETWORKS, ATTACKS):
        assert attack not in report.training[f"{name} unseen:{attack}"].validation_auc


def test_no_image_on_both_sides(run):
    report, _, calls, _ = run
    fit, validation, combiner = (set(report.images[r]) for r in ("fit", "validation", "combiner"))
    assert fit and validation and combiner
    assert not fit & validation and not fit & combiner and not validation & combiner
    # Every detector learns from the fit images only, the combination from the combiner ones.
    assert calls["knn"] and set(calls["knn"]) == {len(fit)}
    assert len(calls["network"]) == len(NETWORKS) * (1 + len(ATTACKS))
    for n_reference, train, valid in calls["network"]:
        assert n_reference == len(fit)
        assert set(train.image) <= fit and set(valid.image) <= validation
        assert not set(train.image) & set(valid.image)
    held_out = [set(ATTACKS) - set(t.attacks) for _, t, _ in calls["network"]]
    assert sorted(map(sorted, held_out)) == [[], [], *sorted([[a] for a in ATTACKS] * 2)]
    assert {int(i) for p in calls["combiner"] for i in p.image} <= combiner
    assert len(calls["layered"]) == 2
    for n_clean, examples in calls["layered"]:
        assert n_clean in (None, len(fit)) and set(examples.image) <= fit
    # The train images used share no image with the calibration and test images evaluated.
    train_images = digits_split("train")[0]
    used = {train_images[i].numpy().tobytes() for i in fit | validation | combiner}
    for name in ("calibration", "test"):
        images = digits_split(name)[0]
        assert not used & {images[i].numpy().tobytes() for i in report.images[name]}


def test_a_saved_screener_scores_as_the_comparison(run, tmp_path):
    """Every detector kind (Mahalanobis with its input pre-processing among them) in one
    screener, saved and reloaded: its scores of the clean test images are the comparison's."""
    report, out, calls, _ = run
    detectors, combiner, scores = calls["best"][0]
    assert set(detectors) == set(DETECTORS) and detectors["mahalanobis"].config.noise > 0
    model = load_digits_model()
    screener = Screener(model, detectors, combiner=combiner)
    loaded = Screener.load(screener.save(tmp_path / "all.frmap"), model)
    test = digits_split("test")[0][report.images["test"]]
    _, got = loaded.scores(test)
    for name in DETECTORS:
        np.testing.assert_allclose(got[name], scores[name]["clean"], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(loaded.combiner(got), scores[COMBINED]["clean"], rtol=1e-5,
                               atol=1e-5)
    assert Screener.load(out / "screener.frmap", model).detectors.keys() <= set(DETECTORS)


def test_files_written(run):
    report, out, _, _ = run
    rows = json.loads((out / "comparison.json").read_text())
    assert len(rows) == len(report.results) + len(report.per_layer) + len(report.unseen)
    assert len((out / "comparison.csv").read_text().splitlines()) == len(rows) + 1
    assert json.loads((out / "comparison-report.json").read_text())["model"] == report.model
    for attack in ATTACKS:
        assert (out / f"comparison-roc-{attack}.png").stat().st_size > 0
        assert (out / "adversarial" / attack / "manifest.json").is_file()
        assert (out / "adversarial-train" / attack / "manifest.json").is_file()
    assert not list(out.glob(".*.tmp"))


def _row(detector: str, attack: str, auc: float, dr: float) -> AttackEvaluation:
    return AttackEvaluation(detector, attack, 10, 10, auc, {"1%": 0.0, "5%": dr, "10%": 1.0},
                            {}, 0.05, 1.0, dr)


def test_too_few_adversarials_are_not_measured():
    few = replace(_row("knn", "one_pixel", 0.1, 0.0), n_adversarial=MIN_ADVERSARIALS - 1)
    lines = comparison_table([_row("knn", "fgsm", 0.9, 0.5), few]).splitlines()
    assert lines[2].split() == ["knn", "0.900", "/", "0.500", *TOO_FEW.split(), "0.900", "/",
                                "0.500"]
    assert "too few to measure" in metrics_table([few])
    assert not few.measured and replace(few, n_adversarial=MIN_ADVERSARIALS).measured
    assert best_layers([replace(few, detector="knn:a", auc=1.0),
                        _row("knn:b", "fgsm", 0.6, 0.1)]) == {"knn": "b"}


def test_table_cells_and_mean():
    lines = comparison_table([
        _row("knn", "fgsm", 0.9, 0.5), _row("knn", "deepfool", 0.7, 0.3),
        _row("knn unseen", "deepfool", 0.6, 0.2),
    ]).splitlines()
    assert lines[0].split() == ["detector", "fgsm", "deepfool", "mean"]
    assert lines[2].split() == ["knn", "0.900", "/", "0.500", "0.700", "/", "0.300",
                                "0.800", "/", "0.400"]
    assert lines[3].split() == ["knn", "unseen", "-", "0.600", "/", "0.200", "0.600", "/",
                                "0.200"]


@pytest.mark.parametrize("kwargs", [
    {"detectors": ("entropy", "nope")}, {"detectors": ()}, {"attacks": ("nope",)},
    {"footprint": "nope"}, {"combiner_fraction": 0.6, "validation_fraction": 0.4},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ComparisonConfig(**kwargs)


@pytest.mark.slow
def test_cli_evaluate_compares_detectors(tmp_path):
    result = frmap("evaluate", "--detectors", "entropy,knn,squeeze", "--attacks", "fgsm",
                   "--limit", "20", "--out", str(tmp_path), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("Detector comparison")[1].splitlines()
    assert table[1].split() == ["detector", "fgsm", "mean", "cost"]
    assert [line.split()[0] for line in table[3:9]] == ["entropy", "knn", "squeeze", COMBINED,
                                                        "knn:features.4", "knn:features.9"]
    assert all(line.split()[-1].endswith("x") for line in table[3:7])
    assert table[7].split()[-1] == "-"  # a single layer's row is not a screen
    assert (tmp_path / "results.json").is_file() and (tmp_path / "comparison.csv").is_file()
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert np.isfinite([r["auc"] for r in rows]).all()


@pytest.mark.slow
def test_cli_rejects_unknown_detector(tmp_path):
    result = frmap("evaluate", "--detectors", "entropy,nope", "--out", str(tmp_path),
                   env=ONE_THREAD)
    assert result.returncode == 1
    assert "unknown detectors ['nope']" in result.stderr
    assert not any(tmp_path.iterdir())


def test_costs_in_forward_passes(run):
    """Each detector's screen and the combination's, in forward passes: at least the forward
    pass itself, the combination at least any of its detectors, the screener's its set's."""
    report, *_ = run
    assert set(report.costs) == {*DETECTORS, COMBINED}
    assert all(np.isfinite(c) and c >= 1.0 for c in report.costs.values())
    assert report.costs[COMBINED] >= max(report.costs[d] for d in DETECTORS)
    assert report.screener_cost >= 1.0
    assert len(report.sets) == 2 ** len(DETECTORS) - 1
    assert report.sets["+".join(DETECTORS)] == pytest.approx(np.mean(
        [r.auc for r in report.results if r.detector == COMBINED and r.measured]))
    chosen_auc = report.sets["+".join(d for d in DETECTORS if d in report.screener)]
    assert chosen_auc == max(report.sets.values())
    chosen = [d for d in report.screener if d != COMBINED]
    assert report.screener_cost == pytest.approx(
        1 + sum(report.costs[d] - 1 for d in chosen))


def test_cheapest_within_a_budget():
    costs = {"entropy": 1.5, "knn": 0.1, "squeeze": 3.0}
    auc = {("entropy",): 0.9, ("knn",): 0.8, ("squeeze",): 0.85, ("entropy", "knn"): 0.95,
           ("entropy", "knn", "squeeze"): 0.97}
    assert cheapest_within(auc, costs, None) == ("entropy", "knn", "squeeze")
    assert cheapest_within(auc, costs, 3.0) == ("entropy", "knn")  # costs 2.6
    assert cheapest_within(auc, costs, 2.0) == ("knn",)
    with pytest.raises(ValueError, match=r"the cheapest, knn, costs 1.10"):
        cheapest_within(auc, costs, 1.05)
    assert set_cost(costs, ("entropy", "knn")) == pytest.approx(2.6)
    assert detector_sets(["a", "b", "c"]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"),
                                              ("b", "c"), ("a", "b", "c")]
    with pytest.raises(ValueError, match="max_cost"):
        ComparisonConfig(max_cost=0.5)


def test_table_cost_column():
    lines = comparison_table([_row("knn", "fgsm", 0.9, 0.5), _row("lid", "fgsm", 0.8, 0.4)],
                             {"knn": 1.25}).splitlines()
    assert lines[0].split()[-1] == "cost"
    assert lines[2].split()[-1] == "1.25x" and lines[3].split()[-1] == "-"


@pytest.mark.slow
def test_cli_max_cost_needs_a_screener(tmp_path):
    result = frmap("evaluate", "--detectors", "entropy,knn", "--max-cost", "2",
                   "--out", str(tmp_path), env=ONE_THREAD)
    assert result.returncode == 1
    assert "--max-cost chooses the saved screener's detectors" in result.stderr
