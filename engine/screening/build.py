"""Detectors fitted from clean images alone, for a screener with the decision "any"."""

from __future__ import annotations

import torch
from torch import nn

from frmap.engine.detectors import (
    Detector,
    EntropyDetector,
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    SqueezeConfig,
    collect_features,
    default_layers,
)
from frmap.engine.models import model_identity

CLEAN_DETECTORS = ("entropy", "knn", "squeeze")


def clean_detectors(names: tuple[str, ...], model: nn.Module, classifier: nn.Module, *,
                    train: tuple[torch.Tensor, torch.Tensor] | None, footprint: str, rule: str,
                    target: str, squeeze: SqueezeConfig, precision: str = "float32",
                    batch_size: int = 64) -> dict[str, Detector]:
    """The detectors `names` (of `CLEAN_DETECTORS`), fitted where they need it on the correctly
    classified `train` images (kNN's neighbours), uncalibrated.

    Args:
        model: the network; classifier: what [0, 1] images go through (`model` behind its
            normalisation).
        train: (images, labels), needed by "knn".
        footprint, rule, target, precision: the entropy detector's.
        squeeze: the feature squeezers.

    Raises:
        ValueError: an unknown name, a detector that needs adversarial examples, or no train
            images for kNN.
    """
    unknown = [n for n in names if n not in CLEAN_DETECTORS]
    if unknown:
        raise ValueError(f"detectors {unknown} cannot be fit on clean images alone (choose from "
                         f"{', '.join(CLEAN_DETECTORS)}; the distance-evolution networks learn "
                         "from adversarial examples: build with frmap evaluate --save-screener)")
    identity = model_identity(model)
    detectors: dict[str, Detector] = {}
    for name in names:
        if name == "entropy":
            detectors[name] = EntropyDetector(footprint, rule, target, identity,
                                              precision=precision)
        elif name == "squeeze":
            detectors[name] = FeatureSqueezer(squeeze, identity)
        else:
            if train is None:
                raise ValueError("the kNN detector needs clean training images")
            config = KNNConfig(default_layers(classifier)[-1])
            features = collect_features(classifier, train[0], (config.layer,),
                                        batch_size=batch_size)
            correct = features.predictions == train[1].numpy()
            detectors[name] = KNNDetector.fit(features.take(correct), train[1].numpy()[correct],
                                              config, model=identity)
    return detectors
