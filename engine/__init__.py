"""frmap.engine: the pipeline from images to decisions.

    image -> models (the CNN) -> responses (what a ReLU rule back-propagates to the image)
          -> frmap.kernels (response image, local entropy) -> detectors (score, threshold)
          -> evaluation (metrics, study, comparison) -> cli

Attacks craft the adversarial images the detectors are measured on; data reads image files and
the digits, and writes files atomically.
"""

from frmap.engine.attacks import ATTACKS, make_attack, run_attack
from frmap.engine.detectors import (
    DistanceEvolutionDetector,
    EntropyDetector,
    FeatureSqueezer,
    KNNDetector,
    load_detector,
)
from frmap.engine.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG_ARCHS,
    Normalized,
    load_vgg,
    load_weights,
    model_identity,
)
from frmap.engine.responses import PATHS, TARGETS, EngineConfig, ResponseEngine

__all__ = [
    "ATTACKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATHS",
    "TARGETS",
    "VGG_ARCHS",
    "DistanceEvolutionDetector",
    "EngineConfig",
    "EntropyDetector",
    "FeatureSqueezer",
    "KNNDetector",
    "Normalized",
    "ResponseEngine",
    "load_detector",
    "load_vgg",
    "load_weights",
    "make_attack",
    "model_identity",
    "run_attack",
]
