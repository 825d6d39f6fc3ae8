"""Layer features by forward hooks, thresholds and the detector file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import vgg19

from frmap.engine.digits import DigitsCNN
from frmap.engine.features import (
    Calibrated,
    Features,
    Threshold,
    collect_features,
    default_layers,
    read_detector_file,
    write_detector_file,
)

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


class _Scorer(Calibrated):
    def __init__(self, threshold=None, model="Net:1"):
        self.threshold, self.model = threshold, model


def test_threshold_and_calibration():
    clean = np.random.default_rng(0).normal(size=1000)
    t = Threshold.fit(clean, 0.05)
    assert t.n_clean == 1000 and t.fpr == 0.05 and t.achieved_fpr == pytest.approx(0.05)
    assert (clean > t.value).sum() == 50
    with pytest.raises(ValueError, match="calibrate it first"):
        _Scorer().predict(clean)
    _Scorer(t).check_model("Net:1")
    with pytest.raises(ValueError, match="fit for model Net:1"):
        _Scorer(t).check_model("Net:2")
    np.testing.assert_array_equal(_Scorer(t).predict([t.value, t.value + 1e-9]), [False, True])


def test_detector_file_round_trip_and_bad_files(tmp_path):
    arrays = {"a": np.arange(5.0), "b:c": np.eye(2, dtype=np.float32)}
    path = write_detector_file(tmp_path / "sub" / "d.npz", "fmt/1", {"x": [1, 2]}, arrays)
    meta, back = read_detector_file(path, "fmt/1")
    assert meta == {"x": [1, 2]} and list(back) == ["a", "b:c"]
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == value.dtype
    with pytest.raises(ValueError, match="format is not other/1"):
        read_detector_file(path, "other/1")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    np.save(tmp_path / "plain.npy", np.arange(3))
    np.savez(tmp_path / "nometa.npz", a=np.arange(3))
    for name, match in (("junk.npz", "not a readable npz"), ("plain.npy", "not a readable npz"),
                        ("nometa.npz", "format is not")):
        with pytest.raises(ValueError, match=match):
            read_detector_file(tmp_path / name, "fmt/1")
    with pytest.raises(FileNotFoundError, match="no such detector file"):
        read_detector_file(tmp_path / "missing.npz", "fmt/1")
