"""Threshold calibration, the entropy detector and the evaluation metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from frmap.engine.data.footprints import STUDY, parse_footprint
from frmap.engine.detectors import (
    EntropyDetector,
    KNNDetector,
    Threshold,
    calibrate_threshold,
    load_detector,
)
from frmap.engine.evaluation.metrics import FPRS, evaluate_attack, roc, table, write_results
from frmap.engine.models import model_identity


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.10, 0.5])
@pytest.mark.parametrize("n", [1, 7, 100, 1001])
def test_calibration_flags_at_most_fpr(fpr, n):
    scores = np.random.default_rng(n).standard_normal(n)
    t = calibrate_threshold(scores, fpr)
    flagged = int((scores > t).sum())
    assert flagged == int(np.floor(fpr * n + 1e-9))  # no ties: exactly the allowed count
    # any lower threshold among the scores would flag more than allowed
    lower = scores[scores < t]
    if lower.size:
        assert (scores > lower.max()).sum() > fpr * n


def test_calibration_with_ties_never_exceeds_fpr():
    scores = np.repeat(np.arange(10.0), 10)  # 100 scores, ties of 10
    for fpr in (0.01, 0.05, 0.10, 0.15):
        assert (scores > calibrate_threshold(scores, fpr)).mean() <= fpr


@pytest.mark.parametrize(("scores", "fpr", "match"), [
    ([], 0.05, "at least one"),
    ([1.0, np.nan], 0.05, "NaN"),
    ([1.0, 2.0], 1.0, r"\[0, 1\)"),
    ([1.0, 2.0], -0.1, r"\[0, 1\)"),
])
def test_calibration_bad_input(scores, fpr, match):
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(np.array(scores), fpr)


def _detector(model="Net:abc"):
    scores = np.random.default_rng(0).normal(1.0, 0.3, 500)
    return EntropyDetector.fit(scores, fpr=0.05, footprint="square3", rule="guided",
                               target="conv_max", model=model)


def test_threshold_fit_flags_the_share_asked_for():
    clean = np.random.default_rng(0).normal(size=1000)
    t = Threshold.fit(clean, 0.05)
    assert t.n_clean == 1000 and t.fpr == 0.05 and t.achieved_fpr == pytest.approx(0.05)
    assert (clean > t.value).sum() == 50


def test_detector_fit_flag_and_round_trip(tmp_path):
    det = _detector()
    t = det.threshold
    assert t.n_clean == 500 and t.achieved_fpr == pytest.approx(0.05, abs=1 / 500)
    scores = np.array([t.value - 1e-9, t.value, t.value + 1e-9])
    np.testing.assert_array_equal(det.flag(scores), [False, False, True])
    path = det.save(tmp_path / "d" / "det.npz")
    loaded = EntropyDetector.load(path)
    assert loaded == det and load_detector(path) == det
    probe = np.random.default_rng(1).normal(1.0, 0.5, 200)
    np.testing.assert_array_equal(loaded.flag(probe), det.flag(probe))
    with pytest.raises(ValueError, match="calibrate it first"):
        EntropyDetector("square3", "guided", "conv_max", "Net:abc").flag(probe)


def test_entropy_detector_json_of_version_one_still_loads(tmp_path):
    old = {"format": "frmap.entropy-detector/1", "threshold": 2.5, "fpr": 0.05,
           "achieved_fpr": 0.048, "n_clean": 356, "footprint": "square3", "rule": "guided",
           "target": "conv_max", "model": "DigitsCNN:0123456789abcdef",
           "versions": {"torch": "2.14.1", "numpy": "2.0", "frmap": "0.1.0"}}
    (tmp_path / "det.json").write_text(json.dumps(old))
    det = EntropyDetector.load(tmp_path / "det.json")
    assert det == EntropyDetector("square3", "guided", "conv_max", "DigitsCNN:0123456789abcdef",
                                  Threshold(2.5, 0.05, 0.048, 356))
    np.testing.assert_array_equal(det.flag([2.5, 2.6]), [False, True])


def test_detector_rejects_other_models_and_bad_files(tmp_path):
    det = _detector()
    det.check_model("Net:abc")
    with pytest.raises(ValueError, match="fit for model Net:abc"):
        det.check_model("Net:xyz")
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "c.json").write_text(json.dumps({"format": "frmap.entropy-detector/1"}))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    np.save(tmp_path / "plain.npy", np.arange(3))
    np.savez(tmp_path / "nometa.npz", a=np.arange(3))
    for name, match in (("a.json", "invalid JSON"), ("b.json", "format"),
                        ("c.json", "malformed"), ("junk.npz", "not a readable npz"),
                        ("plain.npy", "not a readable npz"), ("nometa.npz", "format is not")):
        with pytest.raises(ValueError, match=match):
            EntropyDetector.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such detector"):
        EntropyDetector.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="holds a detector of kind entropy, not knn"):
        KNNDetector.load(det.save(tmp_path / "entropy.npz"))


def test_model_identity_tracks_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert model_identity(a) == model_identity(a)
    assert model_identity(a) != model_identity(b)
    assert model_identity(a).startswith("Linear:")


def test_evaluation_on_known_inputs():
    calibration = np.arange(100.0)          # thresholds: 98, 94, 89 for FPR 1/5/10%
    clean = np.arange(100.0) + 0.5
    adversarial = np.arange(50.0, 150.0)
    r = evaluate_attack(calibration, clean, adversarial, detector="entropy", attack="fgsm")
    # AUC = P(adv > clean) + P(tie) / 2, by brute force over all pairs
    pairs = adversarial[:, None] - clean[None, :]
    assert r.auc == pytest.approx((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
    for fpr in FPRS:
        t = 99 - np.floor(fpr * 100)
        key = f"{fpr * 100:g}%"
        assert r.detection_rate[key] == pytest.approx((adversarial > t).mean())
        assert r.test_fpr[key] == pytest.approx((clean > t).mean())
    flagged_adv, flagged_clean = (adversarial > 94).sum(), (clean > 94).sum()
    assert r.recall == pytest.approx(flagged_adv / adversarial.size)
    assert r.precision == pytest.approx(flagged_adv / (flagged_adv + flagged_clean))
    fpr_curve, tpr_curve = roc(clean, adversarial)
    assert fpr_curve[0] == 0 and tpr_curve[-1] == 1
    assert np.trapezoid(tpr_curve, fpr_curve) == pytest.approx(r.auc)


def test_results_table_json_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    results = [
        evaluate_attack(rng.normal(0, 1, 200), rng.normal(0, 1, 100), rng.normal(m, 1, 80),
                        detector="entropy", attack=a)
        for a, m in (("fgsm", 3.0), ("deepfool", 1.0))
    ]
    text = table(results)
    assert "fgsm" in text and "mean" in text
    write_results(results, tmp_path / "r.json", tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert [d["attack"] for d in data] == ["fgsm", "deepfool"]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert float(rows[0]["auc"]) == pytest.approx(results[0].auc)
    assert results[0].auc > results[1].auc > 0.5


def test_footprint_names():
    assert parse_footprint("square3").shape == (3, 3)
    assert parse_footprint("disk2").sum() == 13
    assert parse_footprint("rect2x5").shape == (2, 5)
    assert all(parse_footprint(n).any() for n in STUDY)
    for bad in ("circle3", "square", "rect0x3", "square0"):
        with pytest.raises(ValueError, match="footprint"):
            parse_footprint(bad)
