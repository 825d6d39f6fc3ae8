"""The Mahalanobis and LID detectors against scipy / numpy on problems with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.neighbors import NearestNeighbors

from frmap.engine.detectors import load_detector
from frmap.engine.detectors.examples import CLEAN, Examples
from frmap.engine.detectors.features import collect_features, default_layers
from frmap.engine.detectors.lid import LIDConfig, LIDDetector, lid_mle
from frmap.engine.detectors.mahalanobis import (
    MahalanobisConfig,
    MahalanobisDetector,
    class_gaussians,
    min_distance,
    min_distance_torch,
)
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.models.digits import load_digits_model, load_digits_split
from frmap.engine.models.runtime import model_identity
from frmap.engine.screening import Screener

from helpers import layer_features

LAYERS = ("a", "b")


def _problem(rng: np.random.Generator, n: int, classes: int = 3, dim: int = 6):
    """Clean features: Gaussian classes around well-separated means; adversarial ones: the same
    plus a large offset off every class (what an attack does to the features, roughly)."""
    labels = rng.integers(0, classes, n)
    centres = np.eye(classes, dim) * 8
    clean = {k: centres[labels] + rng.normal(size=(n, dim)) for k in LAYERS}
    adv = {k: v + rng.normal(scale=4, size=(n, dim)) for k, v in clean.items()}
    examples = Examples.concat([
        Examples.of(layer_features(clean, labels, classes), CLEAN, np.arange(n)),
        Examples.of(layer_features(adv, labels, classes), "attack", np.arange(n))])
    return layer_features(clean, labels, classes), labels, examples


def test_distance_equals_scipy_on_a_hand_made_covariance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    precision = np.linalg.inv(a @ a.T + np.eye(4))
    means = rng.normal(size=(3, 4))
    x = rng.normal(size=(20, 4))
    expected = [min(mahalanobis(v, m, precision) for m in means) for v in x]
    np.testing.assert_allclose(min_distance(x, means, precision), expected, rtol=1e-12)
    got = min_distance_torch(torch.from_numpy(x), torch.from_numpy(means),
                             torch.from_numpy(precision))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("covariance", "estimator"),
                         [("empirical", EmpiricalCovariance), ("ledoit-wolf", LedoitWolf)])
def test_gaussians_are_class_means_and_sklearn_shared_covariance(covariance, estimator):
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(90, 5)), np.repeat([0, 1, 2], 30)
    means, precision = class_gaussians(x, labels, 3, covariance)
    expected_means = np.stack([x[labels == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(means, expected_means, rtol=1e-12)
    fitted = estimator(assume_centered=True).fit(x - expected_means[labels])
    np.testing.assert_allclose(precision, fitted.precision_, rtol=1e-10)
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        class_gaussians(x, labels, 4, covariance)


def _round_trip(detector, tmp_path, features):
    detector = detector.calibrate(detector.score(ScreenPass(features)), 0.05)
    loaded = load_detector(detector.save(tmp_path / "d.npz"))
    assert type(loaded) is type(detector) and loaded.config == detector.config
    assert loaded.threshold == detector.threshold
    p = ScreenPass(features)
    np.testing.assert_array_equal(loaded.score(p), detector.score(p))


def test_mahalanobis_separates_and_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    clean, labels, examples = _problem(rng, 300)
    det = MahalanobisDetector.fit(clean, labels, examples, MahalanobisConfig(LAYERS))
    _, _, test = _problem(rng, 200)
    scores = det.score(ScreenPass(test.features))
    assert scores[test.adversarial].min() > np.median(scores[~test.adversarial])
    assert det.layer_scores(test.features).shape == (400, 2)
    _round_trip(det, tmp_path, test.features)


def test_lid_of_a_linear_subspace_is_its_dimension():
    rng = np.random.default_rng(3)
    for d in (2, 5):
        basis = np.linalg.qr(rng.normal(size=(20, d)))[0]  # [20, d] orthonormal columns
        points = rng.uniform(size=(3000, d)) @ basis.T
        distances = NearestNeighbors(n_neighbors=21).fit(points).kneighbors(points[:300])[0]
        estimate = lid_mle(distances[:, 1:]).mean()  # the first neighbour is the point itself
        assert abs(estimate - d) < 0.2 * d, (d, estimate)


def test_lid_mle_matches_the_formula():
    r = np.array([[1.0, 2.0, 4.0]])
    expected = -1 / np.mean(np.log(r[0] / 4.0))
    np.testing.assert_allclose(lid_mle(r), [expected], rtol=1e-15)


def test_lid_reference_and_combination_use_disjoint_images(tmp_path):
    rng = np.random.default_rng(4)
    _, _, examples = _problem(rng, 200)
    det = LIDDetector.fit(examples, LIDConfig(LAYERS, k=10, reference=60))
    reference = det.references[0]
    clean_a = examples.features.layer("a").astype(np.float64)
    chosen = [np.flatnonzero((clean_a == r).all(1)) for r in reference]
    assert all(len(c) == 1 and not examples.adversarial[c[0]] for c in chosen)
    assert len(reference) == 60
    _, _, test = _problem(rng, 100)
    scores = det.score(ScreenPass(test.features))
    assert np.mean(scores[test.adversarial] > np.median(scores[~test.adversarial])) > 0.9
    _round_trip(det, tmp_path, test.features)
    with pytest.raises(ValueError, match="too few"):
        LIDDetector.fit(examples.take(np.isin(examples.image, np.arange(15))),
                        LIDConfig(LAYERS, k=10))


def test_mahalanobis_preprocessing_lowers_clean_distance():
    model = load_digits_model()
    split = load_digits_split("train")
    layers = default_layers(model)
    x, labels = split.images[:200], split.labels[:200].numpy()
    features = collect_features(model, x, layers)
    examples = Examples.concat([Examples.of(features, CLEAN, np.arange(200)),
                                Examples.of(features.take(np.arange(200)[::-1]), "swap",
                                            np.arange(200))])
    plain = MahalanobisDetector.fit(features, labels, examples, MahalanobisConfig(layers))
    noisy = MahalanobisDetector.fit(features, labels, examples,
                                    MahalanobisConfig(layers, noise=0.002))
    unstepped = plain.preprocessed_features(model, x[:20]).layers[layers[0]]
    np.testing.assert_array_equal(unstepped, features.layers[layers[0]][:20])
    stepped = noisy.preprocessed_features(model, x[:20])
    before, after = plain.layer_scores(features.take(np.arange(20))), noisy.layer_scores(stepped)
    assert (after <= before + 1e-6).mean() > 0.9  # the step goes against the distance's gradient


def test_screener_scores_and_saves_the_new_detectors(tmp_path, digits_examples):
    """Both work as `Detector`s in a screener: its scores are theirs, also after a reload."""
    model, layers = digits_examples.model, digits_examples.layers
    features, labels = digits_examples.features, digits_examples.labels
    examples = digits_examples.examples
    identity = model_identity(model)
    detectors = {
        "mahalanobis": MahalanobisDetector.fit(features, labels, examples,
                                               MahalanobisConfig(layers), model=identity),
        "lid": LIDDetector.fit(examples, LIDConfig(layers, k=10, reference=100),
                                     model=identity),
    }
    test = load_digits_split("test").images[:30]
    own = ScreenPass(collect_features(model, test, layers))
    expected = {k: d.score(own) for k, d in detectors.items()}
    screener = Screener(model, detectors)
    loaded = Screener.load(screener.save(tmp_path / "s.npz"), model)
    for s in (screener, loaded):
        scores = s.scores(test)[1]
        for name, want in expected.items():
            np.testing.assert_allclose(scores[name], want, rtol=1e-10, atol=1e-12)
