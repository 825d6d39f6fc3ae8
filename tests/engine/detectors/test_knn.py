"""The kNN authenticity score against scikit-learn and numpy, on problems with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from frmap.engine.detectors.features import Features
from frmap.engine.detectors.knn import WEIGHTS, KNNConfig, KNNDetector
from frmap.engine.detectors.screen_pass import ScreenPass

from helpers import layer_features


def _features(x: np.ndarray, predicted: np.ndarray, classes: int = 2) -> Features:
    return layer_features({"f": x}, predicted, classes)


def _gaussians(rng: np.random.Generator, n: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian classes: means 0 and 10 * ones, unit variance."""
    labels = rng.integers(0, 2, n)
    return rng.normal(size=(n, dim)) + 10.0 * labels[:, None], labels


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("whiten", [False, True])
def test_two_gaussians_known_answer(weights, whiten):
    rng = np.random.default_rng(0)
    x, y = _gaussians(rng, 400)
    det = KNNDetector.fit(_features(x, y), y, KNNConfig("f", 4, whiten, k=20, weights=weights))
    q, qy = _gaussians(rng, 100)
    # Predicted as their own class: every neighbour agrees.
    np.testing.assert_array_equal(det.score(ScreenPass(_features(q, qy))), np.zeros(100))
    # Predicted as the other class (what a successful attack does): every neighbour disagrees.
    np.testing.assert_array_equal(det.score(ScreenPass(_features(q, 1 - qy))), np.ones(100))


def test_mixed_neighbourhood_scores_in_between():
    rng = np.random.default_rng(1)
    x, y = _gaussians(rng, 400)
    det = KNNDetector.fit(_features(x, y), y, KNNConfig("f", 8, k=50, weights="uniform"))
    midway = np.full((1, 8), 5.0)  # as far from one class as from the other
    assert 0.2 < det.score(ScreenPass(_features(midway, np.array([0]))))[0] < 0.8


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("whiten", [False, True])
def test_against_sklearn_pca_and_numpy_brute_force(weights, whiten):
    rng = np.random.default_rng(2)
    classes, k = 4, 15
    x = rng.normal(size=(300, 20)) * np.linspace(0.5, 3, 20)
    labels = rng.integers(0, classes, 300)
    q = rng.normal(size=(40, 20)) * np.linspace(0.5, 3, 20)
    predicted = rng.integers(0, classes, 40)
    det = KNNDetector.fit(_features(x, labels, classes), labels,
                          KNNConfig("f", 10, whiten, k=k, weights=weights))
    qf = _features(q, predicted, classes)

    pca = PCA(10, whiten=whiten).fit(x.astype(np.float32).astype(np.float64))
    zt, zq = pca.transform(x.astype(np.float32)), pca.transform(q.astype(np.float32))
    np.testing.assert_allclose(det.train, zt, atol=1e-6)  # PCA signs: scikit-learn's svd_flip
    np.testing.assert_allclose(det.reduce(qf), zq, atol=1e-6)

    all_d = np.sqrt(((zq[:, None, :] - zt[None, :, :]) ** 2).sum(-1))  # numpy, no library
    idx = np.argsort(all_d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(all_d, idx, 1)
    got_d, got_i = det.neighbours(qf)
    np.testing.assert_array_equal(got_i, idx)
    np.testing.assert_allclose(got_d, dist, atol=1e-6)
    brute_d, brute_i = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(zt).kneighbors(zq)
    np.testing.assert_array_equal(brute_i, idx)
    np.testing.assert_allclose(brute_d, dist, atol=1e-6)

    w = {"uniform": np.ones_like(dist), "rank": np.tile(1.0 / np.arange(1, k + 1), (40, 1)),
         "distance": 1.0 / dist**2}[weights]
    share = (w * (labels[idx] == predicted[:, None])).sum(1) / w.sum(1)
    np.testing.assert_allclose(det.share(qf), share, atol=1e-9)
    np.testing.assert_allclose(det.score(ScreenPass(qf)), 1 - share, atol=1e-9)


def test_components_are_capped_by_the_layer_width():
    rng = np.random.default_rng(3)
    x, y = _gaussians(rng, 60, dim=5)
    det = KNNDetector.fit(_features(x, y), y, KNNConfig("f", components=256, k=5))
    assert det.components.shape == (5, 5) and det.train.shape == (60, 5)


def test_bad_input_raises():
    rng = np.random.default_rng(4)
    x, y = _gaussians(rng, 30)
    f = _features(x, y)
    with pytest.raises(ValueError, match="unknown weights"):
        KNNConfig("f", weights="gaussian")
    with pytest.raises(ValueError, match="k = 31"):
        KNNDetector.fit(f, y, KNNConfig("f", k=31))
    with pytest.raises(ValueError, match="no layer 'g'"):
        KNNDetector.fit(f, y, KNNConfig("g"))
    with pytest.raises(ValueError, match="labels must have shape"):
        KNNDetector.fit(f, y[:-1], KNNConfig("f", k=5))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    x, y = _gaussians(rng, 200)
    q, qy = _gaussians(rng, 50)
    det = KNNDetector.fit(_features(x, y), y, KNNConfig("f", 6, True, 25, "distance"),
                          model="Net:abc")
    mixed = _features(q, np.where(rng.random(50) < 0.5, qy, 1 - qy))
    det = det.calibrate(det.score(ScreenPass(_features(q, qy))), 0.05)
    loaded = KNNDetector.load(det.save(tmp_path / "knn.npz"))
    assert loaded.config == det.config and loaded.threshold == det.threshold
    assert loaded.model == "Net:abc"
    np.testing.assert_array_equal(loaded.score(ScreenPass(mixed)), det.score(ScreenPass(mixed)))
    np.testing.assert_array_equal(loaded.flag(loaded.score(ScreenPass(mixed))),
                                  det.flag(det.score(ScreenPass(mixed))))
    np.savez(tmp_path / "bad.npz",
             meta=np.array('{"format": "frmap.detector/2", "kind": "knn", "model": "x"}'))
    with pytest.raises(ValueError, match="malformed knn detector"):
        KNNDetector.load(tmp_path / "bad.npz")


def test_neighbours_in_chunks_and_of_no_image():
    """Queries split into chunks find the same neighbours as scikit-learn's brute force."""
    rng = np.random.default_rng(5)
    x, labels = rng.normal(size=(200, 8)), rng.integers(0, 3, 200)
    det = KNNDetector.fit(_features(x, labels, 3), labels, KNNConfig("f", 8, k=7))
    qf = _features(rng.normal(size=(50, 8)), rng.integers(0, 3, 50), 3)
    expected_d, expected_i = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(
        det.train).kneighbors(det.reduce(qf))
    got_d, got_i = det.neighbours(qf, chunk=16)
    np.testing.assert_array_equal(got_i, expected_i)
    np.testing.assert_allclose(got_d, expected_d, atol=1e-9)
    empty_d, empty_i = det.neighbours(qf.take(np.zeros(50, bool)))
    assert empty_d.shape == empty_i.shape == (0, 7)
