"""frmap.engine: feature responses, scores, detectors, attacks, evaluation and the CLI."""

from .models import IMAGENET_MEAN, IMAGENET_STD, VGG_ARCHS, Normalized, load_vgg, load_weights
from .responses import PATHS, TARGETS, EngineConfig, ResponseEngine

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATHS",
    "TARGETS",
    "VGG_ARCHS",
    "EngineConfig",
    "Normalized",
    "ResponseEngine",
    "load_vgg",
    "load_weights",
]
