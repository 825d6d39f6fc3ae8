"""The embedded digits data, the DigitsCNN, its training and its shipped checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from frmap.engine.data.digits import SPLITS, load_digits_split
from frmap.engine.models.digits import (
    CHECKPOINT,
    DigitsCNN,
    accuracy,
    load_digits_model,
    load_report,
    save_checkpoint,
    train_digits,
)


def test_splits_are_fixed_disjoint_and_cover_the_digits():
    splits = {name: load_digits_split(name) for name in SPLITS}
    assert {k: len(v.labels) for k, v in splits.items()} == {
        "train": 1077,
        "calibration": 360,
        "test": 360,
    }
    everything = np.concatenate([s.index for s in splits.values()])
    assert np.array_equal(np.sort(everything), np.arange(1797))
    for name, split in splits.items():
        assert split.images.shape == (len(split.labels), 1, 32, 32)
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.min() >= 0 and split.images.max() <= 1
        assert np.all(np.diff(split.index) > 0)
        assert torch.bincount(split.labels, minlength=10).min() >= 0.08 * len(split.labels)
        again = load_digits_split(name)
        assert np.array_equal(again.index, split.index) and torch.equal(again.images, split.images)


def test_images_are_the_scaled_and_upsampled_sklearn_digits():
    """scikit-image's bilinear resize (half-pixel centres, edge mode) is the oracle."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    test = load_digits_split("test")
    digits = load_digits()
    expected = np.stack(
        [
            resize(im / 16.0, (32, 32), order=1, mode="edge", anti_aliasing=False)
            for im in digits.images[test.index]
        ]
    )
    np.testing.assert_allclose(test.images[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert np.array_equal(test.labels.numpy(), digits.target[test.index])


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_split("validation")


def test_model_layout_suits_the_response_engine():
    model = DigitsCNN()
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier, nn.Sequential)
    kinds = {type(m) for m in model.modules()} - {DigitsCNN}
    assert kinds == {nn.Sequential, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear}
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_every_activation_is_a_relu_module():
    """With every nn.ReLU swapped for nn.Identity the network becomes linear."""
    model = DigitsCNN().eval()
    for seq in (model.features, model.classifier):
        for i, layer in enumerate(seq):
            if isinstance(layer, nn.ReLU):
                seq[i] = nn.Identity()
            if isinstance(layer, nn.MaxPool2d):
                seq[i] = nn.AvgPool2d(2)
    x, y = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        zero = model(torch.zeros(1, 1, 32, 32))
        torch.testing.assert_close(
            model(x + y) - zero, model(x) - zero + model(y) - zero, atol=1e-4, rtol=1e-4
        )


def test_training_is_reproducible():
    a, report_a = train_digits(seed=3, epochs=1, threads=1, progress=False)
    b, report_b = train_digits(seed=3, epochs=1, threads=1, progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert dataclasses.replace(report_a, seconds=0) == dataclasses.replace(report_b, seconds=0)
    assert (
        report_a.epochs == 1 and report_a.seed == 3 and report_a.torch_version == torch.__version__
    )
    assert not a.training


def test_checkpoint_round_trip(tmp_path):
    model, report = train_digits(seed=0, epochs=1, threads=1, progress=False)
    path = tmp_path / "net.safetensors"
    save_checkpoint(model, report, path)
    loaded = load_digits_model(path)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert load_report(path) == report


def test_loader_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no digits checkpoint"):
        load_digits_model(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_digits_model(garbage)
    state = {k: v.clone() for k, v in DigitsCNN().state_dict().items()}
    state["classifier.2.weight"] = torch.zeros(5, 64)
    del state["features.0.bias"]
    state["extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError) as err:
        load_digits_model(bad)
    message = str(err.value)
    assert 'Missing key(s) in state_dict: "features.0.bias"' in message
    assert 'Unexpected key(s) in state_dict: "extra"' in message
    assert "size mismatch for classifier.2.weight" in message and "[10, 64]" in message


def test_shipped_checkpoint_reaches_its_recorded_accuracy():
    assert CHECKPOINT.stat().st_size < 1_000_000
    report = load_report()
    model = load_digits_model()
    measured = accuracy(model, load_digits_split("test"))
    assert report.test_accuracy >= 0.97
    assert abs(measured - report.test_accuracy) <= 1 / 360 + 1e-12
    assert report.parameters == sum(p.numel() for p in model.parameters())
