"""Engine test fixtures shared by several test modules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from frmap.engine.detectors import Detector, Features, collect_features, default_layers
from frmap.engine.detectors.examples import CLEAN, Examples
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.models.digits import load_digits_model, load_digits_split
from frmap.engine.models.runtime import torch_settings
from frmap.engine.screening.build import clean_detectors


def _one_thread():
    """One torch thread: tiny models run fastest, and least disturbed by other processes, on one
    thread; the caller's count is restored afterwards."""
    with torch_settings(1):
        yield


# inside one test; and from its first use to the end of a module (its module fixtures included)
one_thread = pytest.fixture(_one_thread, name="one_thread")
module_one_thread = pytest.fixture(_one_thread, scope="module", name="module_one_thread")


@pytest.fixture(scope="session")
def demo_detectors() -> tuple[nn.Module, dict[str, Detector]]:
    """The digits CNN and the demo's detectors, uncalibrated: entropy (square3, guided,
    conv_max), kNN on 300 train digits, squeezing."""
    model = load_digits_model()
    train = load_digits_split("train")
    return model, clean_detectors(("entropy", "knn", "squeeze"), model, model,
                                  train=(train.images[:300], train.labels[:300]),
                                  footprint="square3", rule="guided", target="conv_max",
                                  squeeze=DIGITS_SQUEEZERS)


@dataclass(frozen=True)
class DigitsExamples:
    """300 train digits: their features and labels, and detector examples whose
    "adversarial" versions are the digits with uniform noise (up to 0.3) added."""

    model: nn.Module
    layers: tuple[str, ...]
    features: Features
    labels: np.ndarray
    examples: Examples


@pytest.fixture(scope="session")
def digits_examples() -> DigitsExamples:
    model = load_digits_model()
    layers = default_layers(model)
    train = load_digits_split("train")
    x, labels = train.images[:300], train.labels[:300].numpy()
    features = collect_features(model, x, layers)
    noisy = (x + 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    examples = Examples.concat([Examples.of(features, CLEAN, np.arange(300)),
                                Examples.of(collect_features(model, noisy, layers), "noise",
                                            np.arange(300))])
    return DigitsExamples(model, layers, features, labels, examples)
