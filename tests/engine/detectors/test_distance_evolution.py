"""Distance-space evolution: references, embeddings, splits, training, on known problems."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from frmap.engine.detectors.distance_evolution import (
    DistanceEvolutionDetector,
    EvolutionConfig,
    _balanced_weights,
    class_references,
    embed,
)
from frmap.engine.detectors.examples import CLEAN, Examples, leave_one_attack_out, split_by_image
from frmap.engine.detectors.features import Features
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.evaluation.metrics import evaluate_attack

CLASSES, LAYERS, DIM = 3, ("l0", "l1", "l2"), 6
# Class c's mean on every layer: 4 on dimensions 2c and 2c + 1, 1 elsewhere.
MEANS = 1.0 + 3.0 * np.kron(np.eye(CLASSES), np.ones(2))


def _versions(rng: np.random.Generator, classes: np.ndarray, attack: str) -> Features:
    """Clean: near the class mean on every layer. "switch": the last layer jumps to the next
    class (a trajectory that changes class late). "far": no layer near any class."""
    layers = {}
    for i, name in enumerate(LAYERS):
        centre = MEANS[classes]
        if attack == "switch" and i == len(LAYERS) - 1:
            centre = MEANS[(classes + 1) % CLASSES]
        if attack == "far":
            centre = rng.uniform(0, 6, (len(classes), DIM))
        layers[name] = (centre + rng.normal(0, 0.3, (len(classes), DIM))).astype(np.float32)
    return Features(layers, np.eye(CLASSES, dtype=np.float32)[classes])


def _examples(rng: np.random.Generator, n_images: int, first: int = 0) -> Examples:
    """Every source image as a clean, a "switch" and a "far" version."""
    classes = rng.integers(0, CLASSES, n_images)
    images = np.arange(first, first + n_images)
    return Examples.concat([Examples.of(_versions(rng, classes, a), a, images)
                            for a in (CLEAN, "switch", "far")])


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 150)
    reference = _versions(rng, labels, CLEAN)
    train, validation = split_by_image(_examples(rng, 300), 0.25, seed=1)
    return reference, labels, train, validation, _examples(rng, 200, first=1000)


def test_references_against_direct_computation():
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    centroids = class_references(x, labels, 3, "centroid")
    medoids = class_references(x, labels, 3, "medoid")
    for c in range(3):
        members = x[labels == c]
        np.testing.assert_allclose(centroids[c], members.sum(0) / len(members), atol=1e-12)
        sums = [sum(np.sqrt(((m - o) ** 2).sum()) for o in members) for m in members]
        np.testing.assert_array_equal(medoids[c], members[int(np.argmin(sums))])
    with pytest.raises(ValueError, match=r"classes \[3\] have no training samples"):
        class_references(x, labels, 4, "medoid")
    with pytest.raises(ValueError, match="unknown reference"):
        class_references(x, labels, 3, "mean")


def test_embeddings_against_direct_computation():
    rng = np.random.default_rng(1)
    x, refs = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
    x[0] = 0.0
    dist, cos = embed(x, refs, "euclidean"), embed(x, refs, "cosine")
    for i in range(7):
        for c in range(3):
            assert dist[i, c] == pytest.approx(np.linalg.norm(x[i] - refs[c]), abs=1e-12)
            norm = np.linalg.norm(x[i]) * np.linalg.norm(refs[c])
            expected = 0.0 if i == 0 else float(x[i] @ refs[c]) / norm
            assert cos[i, c] == pytest.approx(expected, abs=1e-12)


def test_split_by_image_has_no_leakage(problem):
    *_, test = problem
    rest, picked = split_by_image(test, 0.3, seed=4)
    assert len(rest) + len(picked) == len(test)
    assert not set(rest.image) & set(picked.image)
    assert len(set(picked.image)) == 60
    with pytest.raises(ValueError, match="leaves one side empty"):
        split_by_image(test, 0.0)


@pytest.mark.parametrize("held_out", ["switch", "far"])
def test_leave_one_attack_out_has_no_leakage(problem, held_out):
    *_, examples = problem
    train, test = leave_one_attack_out(examples, held_out, test_fraction=0.4, seed=2)
    assert not set(train.image) & set(test.image)
    assert held_out not in train.attacks and train.attacks
    assert test.attacks == (held_out,) and (test.attack == CLEAN).any()
    every = {(a, i) for a, i in zip(examples.attack, examples.image, strict=True)}
    kept = {(a, i) for e in (train, test) for a, i in zip(e.attack, e.image, strict=True)}
    assert kept <= every
    with pytest.raises(ValueError, match="no 'pgd' examples"):
        leave_one_attack_out(examples, "pgd")


def test_balanced_weights(problem):
    _, _, train, *_ = problem
    w = _balanced_weights(train).numpy()
    assert w[train.attack == CLEAN].sum() == pytest.approx(0.5)
    for attack in ("switch", "far"):
        assert w[train.attack == attack].sum() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="clean and adversarial"):
        _balanced_weights(train.take(train.attack == CLEAN))


@pytest.mark.parametrize(("network", "reference", "embedding", "standardise", "predicted_first"), [
    ("lstm", "medoid", "cosine", True, False),
    ("mlp", "centroid", "euclidean", True, False),
    ("mlp", "medoid", "cosine", False, False),
    ("lstm", "centroid", "cosine", True, True),
])
def test_detects_known_adversarial_trajectories(problem, network, reference, embedding,
                                                standardise, predicted_first, tmp_path):
    reference_features, labels, train, validation, test = problem
    config = EvolutionConfig(LAYERS, reference, embedding, network, standardise,
                             predicted_first, epochs=8, lr=3e-3)
    det = DistanceEvolutionDetector.fit(reference_features, labels, train, validation, config,
                                        model="Net:abc")
    history = det.report.history
    assert len(history) == 8 and det.report.best_epoch == int(np.argmax(history)) + 1
    assert np.mean(list(det.report.validation_auc.values())) == max(history)
    scores = det.score(ScreenPass(test.features))
    clean = scores[test.attack == CLEAN]
    for attack in ("switch", "far"):
        result = evaluate_attack(clean, clean, scores[test.attack == attack],
                                 detector=network, attack=attack)
        assert result.auc > 0.98, (attack, result.auc)

    det = det.calibrate(clean, 0.05)
    loaded = DistanceEvolutionDetector.load(det.save(tmp_path / "det.npz"))
    assert loaded.config == det.config and loaded.report == det.report
    assert loaded.threshold == det.threshold and loaded.model == "Net:abc"
    np.testing.assert_array_equal(loaded.score(ScreenPass(test.features)), scores)


@pytest.mark.parametrize(("standardise", "predicted_first"), [(True, False), (False, False),
                                                              (False, True), (True, True)])
def test_sequences_are_the_embeddings_standardised_or_raw(problem, standardise,
                                                          predicted_first):
    reference, labels, train, validation, test = problem
    det = DistanceEvolutionDetector.fit(
        reference, labels, train, validation,
        EvolutionConfig(LAYERS, embedding="euclidean", standardise=standardise,
                        predicted_first=predicted_first, epochs=1))

    def raw(features):
        out = np.stack([cdist(features.layer(k), det.references[k]) for k in LAYERS], 1)
        if predicted_first:  # entry j: the class j places after the predicted one
            out = np.stack([np.roll(row, -p, axis=1)
                            for row, p in zip(out, features.predictions, strict=True)])
        return out

    train_raw, test_raw = raw(train.features), raw(test.features)
    if standardise:
        mean, std = train_raw.mean((0, 2)), train_raw.std((0, 2))
        test_raw = (test_raw - mean[:, None]) / std[:, None]
        np.testing.assert_allclose(det.sequences(train.features).mean((0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(det.sequences(test.features), test_raw, rtol=1e-5, atol=1e-5)


def test_stops_once_validation_stops_rising(problem):
    reference, labels, train, validation, _ = problem
    config = EvolutionConfig(LAYERS, network="mlp", epochs=200, lr=3e-3, patience=3,
                             lr_patience=1)
    report = DistanceEvolutionDetector.fit(reference, labels, train, validation, config).report
    history = report.history
    assert len(history) == report.best_epoch + 3 < 200, (report.best_epoch, len(history))
    assert max(history[report.best_epoch:]) <= history[report.best_epoch - 1]


def test_training_is_deterministic(problem):
    reference, labels, train, validation, test = problem
    config = EvolutionConfig(LAYERS, epochs=2, network="lstm")
    a, b = (DistanceEvolutionDetector.fit(reference, labels, train, validation, config)
            for _ in range(2))
    for key, value in a.state.items():
        np.testing.assert_array_equal(value, b.state[key])
    other = DistanceEvolutionDetector.fit(reference, labels, train, validation,
                                          EvolutionConfig(LAYERS, epochs=2, seed=1))
    test_pass = ScreenPass(test.features)
    assert not np.array_equal(other.score(test_pass), a.score(test_pass))


def test_bad_config_and_files(problem, tmp_path):
    reference, labels, train, validation, _ = problem
    with pytest.raises(ValueError, match="unknown option 'gru'"):
        EvolutionConfig(LAYERS, network="gru")
    with pytest.raises(ValueError, match="no layer 'l9'"):
        DistanceEvolutionDetector.fit(reference, labels, train, validation,
                                      EvolutionConfig(("l9",), epochs=1))
    with pytest.raises(ValueError, match="validation needs"):
        DistanceEvolutionDetector.fit(reference, labels, train,
                                      validation.take(validation.attack == CLEAN),
                                      EvolutionConfig(LAYERS, epochs=1))
    np.savez(tmp_path / "bad.npz",
             meta=np.array('{"format": "frmap.detector/2", "kind": "distance-evolution"}'))
    with pytest.raises(ValueError, match="malformed distance-evolution"):
        DistanceEvolutionDetector.load(tmp_path / "bad.npz")
