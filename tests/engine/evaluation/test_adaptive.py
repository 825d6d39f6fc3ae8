"""The adaptive attacker: surrogates against the detectors' own scores, the attack's bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frmap.engine.detectors import (
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    LIDConfig,
    LIDDetector,
    MahalanobisConfig,
    MahalanobisDetector,
    collect_features,
)
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.evaluation.adaptive import (
    AdaptiveConfig,
    adaptive_pgd,
    knn_surrogate,
    lid_surrogate,
    mahalanobis_surrogate,
    squeeze_surrogate,
    standardised,
)
from frmap.engine.models.digits import load_digits_split

from helpers import screen_pass


@pytest.fixture(scope="module")
def fitted(digits_examples, module_one_thread):
    """Detectors fitted on 300 digits; the "adversarial" examples are noisy digits."""
    model, layers = digits_examples.model, digits_examples.layers
    features, labels = digits_examples.features, digits_examples.labels
    examples = digits_examples.examples
    detectors = {
        "mahalanobis": MahalanobisDetector.fit(features, labels, examples,
                                               MahalanobisConfig(layers)),
        "lid": LIDDetector.fit(examples, LIDConfig(layers, k=10, reference=100)),
        "knn": KNNDetector.fit(features, labels, KNNConfig(layers[-1], components=16, k=10)),
    }
    test = load_digits_split("test")
    return model, layers, detectors, test.images[:24], test.labels[:24]


@pytest.mark.parametrize(("name", "surrogate"), [("mahalanobis", mahalanobis_surrogate),
                                                 ("lid", lid_surrogate)])
def test_exact_surrogates_equal_the_scores(fitted, name, surrogate):
    model, layers, detectors, x, _ = fitted
    expected = detectors[name].score(ScreenPass(collect_features(model, x, layers)))
    with torch.no_grad():
        got = surrogate(model, detectors[name])(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_squeeze_surrogate_equals_the_score_and_has_gradients(fitted):
    model, _, _, x, _ = fitted
    squeezer = FeatureSqueezer(DIGITS_SQUEEZERS)
    surrogate = squeeze_surrogate(model, squeezer)
    x = x.clone().requires_grad_()
    score = surrogate(x)
    np.testing.assert_allclose(score.detach().numpy(),
                               squeezer.score(screen_pass(model, x.detach(), squeezer)),
                               rtol=1e-5, atol=1e-6)
    score.sum().backward()
    assert x.grad.abs().sum() > 0


def test_knn_surrogate_ranks_like_the_score(fitted):
    model, layers, detectors, x, y = fitted
    adversarial, _ = adaptive_pgd(model, None, x, y, AdaptiveConfig(epsilon=0.2, steps=10,
                                                                    step=0.03))
    both = torch.cat([x, adversarial])
    expected = detectors["knn"].score(ScreenPass(collect_features(model, both, layers)))
    with torch.no_grad():
        got = knn_surrogate(model, detectors["knn"])(both).numpy()
    assert np.corrcoef(got, expected)[0, 1] > 0.8


def test_attack_stays_in_bounds_and_lowers_the_surrogate(fitted):
    model, _, detectors, x, y = fitted
    config = AdaptiveConfig(epsilon=0.15, steps=20, step=0.02)
    surrogate = standardised(mahalanobis_surrogate(model, detectors["mahalanobis"]), x)
    plain, plain_found = adaptive_pgd(model, None, x, y, config)
    adaptive, found = adaptive_pgd(model, surrogate, x, y, config)
    for adv, hit in ((plain, plain_found), (adaptive, found)):
        assert hit.sum() >= len(x) // 2
        assert (adv - x).abs().max() <= config.epsilon + 1e-6 and adv.min() >= 0
        assert (model(adv[hit]).argmax(1) != y[hit]).all()
        assert torch.equal(adv[~hit], x[~hit])
    both = found & plain_found
    with torch.no_grad():
        assert surrogate(adaptive[both]).mean() < surrogate(plain[both]).mean()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="epsilon"):
        AdaptiveConfig(epsilon=0)
