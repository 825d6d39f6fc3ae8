"""Layer features by forward hooks, thresholds and the detector file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import vgg19

from frmap.engine.detectors import Features, collect_features, default_layers
from frmap.engine.models import DigitsCNN

DIGITS_LAYERS = ("features.4", "features.9", "features.12", "classifier.1")
VGG19_LAYERS = ("features.4", "features.9", "features.18", "features.27", "features.36",
                "classifier.1", "classifier.4")


@pytest.fixture(scope="module")
def digits_model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_default_layers_digits_and_vgg19():
    assert default_layers(DigitsCNN()) == DIGITS_LAYERS
    with torch.device("meta"):
        vgg = vgg19()
    assert default_layers(vgg) == VGG19_LAYERS
    wrapped = nn.Sequential(nn.Identity(), vgg)  # e.g. a normalisation layer in front
    assert default_layers(wrapped) == tuple(f"1.{name}" for name in VGG19_LAYERS)
    with pytest.raises(ValueError, match="no VGG-like"):
        default_layers(nn.Linear(3, 2))


def test_features_equal_direct_computation_and_hooks_are_removed(digits_model, images):
    got = collect_features(digits_model, images, batch_size=4)
    assert _no_hooks(digits_model)
    with torch.no_grad():
        f = digits_model.features
        expected = {
            "features.4": f[:5](images).mean((2, 3)),
            "features.9": f[:10](images).mean((2, 3)),
            "features.12": f(images).mean((2, 3)),
            "classifier.1": digits_model.classifier[:2](torch.flatten(f(images), 1)),
        }
        logits = digits_model(images)
    assert tuple(got.layers) == DIGITS_LAYERS
    for name, value in expected.items():
        assert got.layers[name].dtype == np.float32
        np.testing.assert_allclose(got.layers[name], value.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.logits, logits.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the model's outputs are unchanged afterwards
        np.testing.assert_array_equal(digits_model(images).numpy(), logits.numpy())


def test_hooks_are_removed_when_the_forward_pass_fails(digits_model):
    with pytest.raises(RuntimeError):
        collect_features(digits_model, torch.zeros(2, 3, 32, 32))
    assert _no_hooks(digits_model)


def test_bad_layers_raise(digits_model, images):
    with pytest.raises(ValueError, match="no layers"):
        collect_features(digits_model, images, ["features.99"])
    with pytest.raises(ValueError, match="more than once"):
        collect_features(digits_model, images, ["features.4", "features.4"])
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    with pytest.raises(ValueError, match="exactly once"):
        collect_features(twice, torch.zeros(2, 4), ["1"])
    assert _no_hooks(twice)


def test_logits_only_and_feature_helpers(digits_model, images):
    only = collect_features(digits_model, images, ())
    assert only.layers == {} and only.logits.shape == (10, 10)
    feats = collect_features(digits_model, images)
    torch_probs = torch.from_numpy(feats.logits).double().softmax(1).numpy()
    np.testing.assert_allclose(feats.probabilities, torch_probs, atol=1e-12)
    np.testing.assert_array_equal(feats.predictions, feats.logits.argmax(1))
    back = Features.concat([feats.take(np.arange(3)), feats.take(np.arange(3, 10))])
    np.testing.assert_array_equal(back.logits, feats.logits)
    for name in DIGITS_LAYERS:
        np.testing.assert_array_equal(back.layers[name], feats.layers[name])
    with pytest.raises(ValueError, match="same layers"):
        Features.concat([feats, only])
