"""Screener: scores equal each detector's own, decisions follow the calibrated thresholds,
the combination is scikit-learn's logistic regression, and files round-trip or fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from frmap.engine.data import load_digits_split, parse_footprint
from frmap.engine.detectors import EntropyDetector, collect_features
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.detectors.threshold import calibrate_threshold
from frmap.engine.models import DigitsCNN, model_identity
from frmap.engine.responses import ResponseEngine
from frmap.engine.screening import Combiner, Screener
from frmap.engine.screening.build import clean_detectors

from helpers import direct_squeeze_scores

FPR = 0.1


@pytest.fixture(scope="module")
def digits(demo_detectors):
    model, detectors = demo_detectors
    cal, test = load_digits_split("calibration"), load_digits_split("test")
    screener = Screener(model, detectors, batch_size=16).calibrate(cal.images[:120], FPR)
    return model, screener, cal.images[:120], test.images[:24]


def test_scores_are_each_detectors_own(digits):
    model, screener, _, images = digits
    features, scores = screener.scores(images)
    d = screener.detectors
    entropy = ResponseEngine(model, preprocess=None).scores(images, parse_footprint("square3"))
    np.testing.assert_allclose(scores["entropy"], entropy.numpy(), rtol=0, atol=1e-12)
    # the features come from the reverse walk's forward pass (channels-last convolutions):
    # equal to the classifier's own to float32 rounding
    own = ScreenPass(collect_features(model, images, d["knn"].layers))
    np.testing.assert_allclose(scores["knn"], d["knn"].score(own), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores["squeeze"],
                               direct_squeeze_scores(model, images, d["squeeze"]),
                               rtol=0, atol=1e-5)
    assert screener.runner.one_pass
    with torch.no_grad():
        logits = model(images)
    np.testing.assert_allclose(features.logits, logits.numpy(), rtol=1e-5, atol=1e-5)


def test_any_decision_flags_what_some_detector_flags(digits):
    _, screener, clean, images = digits
    _, clean_scores = screener.scores(clean)
    result = screener.screen(images)
    expected = np.zeros(len(images), bool)
    for name, detector in screener.detectors.items():
        threshold = calibrate_threshold(clean_scores[name], FPR / 3)
        assert detector.threshold.value == threshold and detector.threshold.fpr == FPR / 3
        expected |= result.scores[name] > threshold
    np.testing.assert_array_equal(result.flagged, expected)
    assert screener.decision == "any" and result.combined is None
    probabilities = torch.softmax(screener.model(images), 1).detach().numpy()
    np.testing.assert_array_equal(result.predicted, probabilities.argmax(1))
    np.testing.assert_allclose(result.confidence, probabilities.max(1), atol=1e-6)
    record = result.record(0)
    assert set(record) == {"prediction", "confidence", "scores", "combined", "flagged"}
    assert json.loads(json.dumps(record)) == record


def test_combiner_is_sklearns_logistic_regression():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    scores = {"a": rng.normal(size=400) + 2 * y, "b": rng.normal(3, 5, 400) - y,
              "c": rng.normal(size=400)}
    combiner = Combiner.fit(scores, y)
    reference = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    reference.fit(np.column_stack(list(scores.values())), y)
    probe = {k: rng.normal(size=50) for k in scores}
    np.testing.assert_allclose(combiner(probe),
                               reference.decision_function(np.column_stack(list(probe.values()))),
                               rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="clean and adversarial"):
        Combiner.fit(scores, np.ones(400, bool))


def test_combined_screener_round_trips(digits, tmp_path):
    model, screener, clean, images = digits
    _, scores = screener.scores(images)
    labels = np.arange(len(images)) % 2 == 0
    combiner = Combiner.fit(scores, labels)
    combined = Screener(model, screener.detectors, combiner=combiner, batch_size=8)
    combined = combined.calibrate(clean, FPR)
    _, clean_scores = combined.scores(clean)
    assert combined.threshold.value == calibrate_threshold(combiner(clean_scores), FPR)
    result = combined.screen(images)
    np.testing.assert_array_equal(result.flagged, result.combined > combined.threshold.value)
    loaded = Screener.load(combined.save(tmp_path / "s.frmap"), model, batch_size=8)
    again = loaded.screen(images)
    assert loaded.decision == "combined" and list(loaded.detectors) == list(combined.detectors)
    for key in ("predicted", "confidence", "combined", "flagged"):
        np.testing.assert_array_equal(getattr(again, key), getattr(result, key))
    for name in result.scores:
        np.testing.assert_array_equal(again.scores[name], result.scores[name])


def test_screener_refuses_another_model_and_bad_files(digits, tmp_path):
    model, screener, _, images = digits
    path = screener.save(tmp_path / "s.frmap")
    with pytest.raises(ValueError, match=r"s\.frmap: made for model DigitsCNN:"):
        Screener.load(path, DigitsCNN())
    with pytest.raises(FileNotFoundError, match="no such screener file"):
        Screener.load(tmp_path / "missing.frmap", model)
    (tmp_path / "junk.frmap").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.frmap: neither a screener nor a detector file"):
        Screener.load(tmp_path / "junk.frmap", model)
    meta = {"format": "frmap.screener/1", "model": model_identity(model), "preprocess": None,
            "decision": "majority", "fpr": 0.1, "threshold": None, "detectors": {},
            "combiner": None}
    with open(tmp_path / "bad.frmap", "wb") as f:  # np.savez would add .npz to a name
        np.savez(f, meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match="bad.frmap: field 'decision'"):
        Screener.load(tmp_path / "bad.frmap", model)
    with pytest.raises(ValueError, match="calibrate it first"):
        Screener(model, {"entropy": EntropyDetector("square3", "guided", "conv_max",
                                                    model_identity(model))}).screen(images)
    with pytest.raises(ValueError, match="needs adversarial|cannot be fit on clean"):
        clean_detectors(("distance-lstm",), model, model, train=None, footprint="square3",
                        rule="guided", target="conv_max", squeeze=DIGITS_SQUEEZERS)


def test_entropy_detector_file_loads_as_a_one_detector_screener(digits, tmp_path):
    model, _, clean, images = digits
    engine = ResponseEngine(model, preprocess=None)
    detector = EntropyDetector.fit(engine.scores(clean, parse_footprint("square3")).numpy(),
                                   fpr=FPR, footprint="square3", rule="guided",
                                   target="conv_max", model=model_identity(model))
    screener = Screener.load(detector.save(tmp_path / "det.npz"), model)
    result = screener.screen(images)
    np.testing.assert_array_equal(result.flagged,
                                  detector.flag(engine.scores(images, parse_footprint("square3"))
                                                .numpy()))


def test_a_bf16_entropy_detector_screens_in_bf16_and_keeps_it_in_its_file(digits, tmp_path):
    model, _, clean, images = digits
    footprint = parse_footprint("square3")
    bf16 = ResponseEngine(model, preprocess=None, precision="bf16")
    detector = EntropyDetector.fit(bf16.scores(clean, footprint).numpy(), fpr=FPR,
                                   footprint="square3", rule="guided", target="conv_max",
                                   model=model_identity(model), precision="bf16")
    screener = Screener(model, {"entropy": detector}).calibrate(clean, FPR)
    loaded = Screener.load(screener.save(tmp_path / "bf16.frmap"), model)
    assert loaded.detectors["entropy"].precision == "bf16"
    scores = loaded.scores(images)[1]["entropy"]
    np.testing.assert_allclose(scores, bf16.scores(images, footprint).numpy(), rtol=0, atol=1e-12)
    float32 = ResponseEngine(model, preprocess=None).scores(images, footprint).numpy()
    assert not np.allclose(scores, float32, rtol=0, atol=1e-6)


def test_entropy_detector_files_without_a_precision_are_float32_and_bad_ones_fail(digits,
                                                                                  tmp_path):
    from frmap.engine.detectors import load_detector
    from frmap.engine.detectors.archive import read_archive, write_archive

    model = digits[0]
    path = EntropyDetector("square3", "guided", "conv_max", model_identity(model)).save(
        tmp_path / "det.npz")
    meta, arrays = read_archive(path, "frmap.detector/2")
    for value, expected in ((None, "float32"), ("fp8", None)):
        if value is None:
            meta.pop("precision")
        else:
            meta["precision"] = value
        write_archive(path, {"format": "frmap.detector/2", **meta}, arrays)
        if expected:
            assert load_detector(path).precision == expected
        else:
            with pytest.raises(ValueError, match=r"det.npz.*field 'precision' must be one of"):
                load_detector(path)


@pytest.mark.parametrize("field, value, message", [
    ("decision", "majority", "field 'decision' must be one of"),
    ("preprocess", "vgg", "field 'preprocess' must be one of"),
    ("fpr", 1.0, "field 'fpr' must lie in"),
    ("fpr", "0.1", "field 'fpr' must be a finite number"),
    ("threshold", {"value": 1.0, "fpr": 0.1, "achieved_fpr": 0.1, "n_clean": True},
     "field 'threshold.n_clean' must be an integer"),
    ("threshold", {"value": 1.0, "fpr": 2.0, "achieved_fpr": 0.1, "n_clean": 5},
     "field 'threshold.fpr' must be a finite number in"),
    ("detectors", {}, "field 'detectors' must name at least one detector"),
    ("detectors", [], "field 'detectors' must name at least one detector"),
    ("combiner", None, "field 'combiner' is needed by decision 'combined'"),
])
def test_every_screener_field_is_checked_and_named(digits, tmp_path, field, value, message):
    from frmap.engine.detectors.archive import read_archive, write_archive

    model, screener, clean, _ = digits
    combined = Screener(model, screener.detectors,
                        combiner=Combiner.fit({n: np.r_[s, s + 1] for n, s in
                                               screener.scores(clean[:20])[1].items()},
                                              np.r_[np.zeros(20), np.ones(20)].astype(bool)))
    meta, arrays = read_archive(combined.calibrate(clean, FPR).save(tmp_path / "s.frmap"),
                                "frmap.screener/1")
    write_archive(tmp_path / "s.frmap", {"format": "frmap.screener/1", **meta, field: value},
                  arrays)
    with pytest.raises(ValueError, match=rf"s\.frmap: {message}"):
        Screener.load(tmp_path / "s.frmap", model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_screener_on_cuda_gives_the_cpus_scores(digits, tmp_path):
    import copy

    model, screener, _, images = digits
    gpu = Screener.load(screener.save(tmp_path / "s.frmap"), copy.deepcopy(model).cuda(),
                        batch_size=16)
    want, got = screener.screen(images), gpu.screen(images)
    np.testing.assert_array_equal(got.predicted, want.predicted)
    np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-5)
    for name in ("knn", "squeeze"):
        np.testing.assert_allclose(got.scores[name], want.scores[name], rtol=1e-4, atol=1e-5)
    # float32 in another order may flip a rare ReLU mask and move a few response pixels
    assert np.abs(got.scores["entropy"] - want.scores["entropy"]).mean() < 2e-3
