"""Detectors: each fits on clean data, scores images (higher = more adversarial), calibrates a
threshold to a false-positive rate, and saves to one file format (`base`)."""

from frmap.engine.detectors.base import Detector, load_detector
from frmap.engine.detectors.distance_evolution import (
    DistanceEvolutionDetector,
    EvolutionConfig,
    EvolutionTrainReport,
)
from frmap.engine.detectors.entropy import EntropyDetector
from frmap.engine.detectors.examples import CLEAN, Examples
from frmap.engine.detectors.features import Features, collect_features, default_layers
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.knn import KNNConfig, KNNDetector
from frmap.engine.detectors.lid import LIDConfig, LIDDetector
from frmap.engine.detectors.mahalanobis import MahalanobisConfig, MahalanobisDetector
from frmap.engine.detectors.squeeze import FeatureSqueezer, SqueezeConfig
from frmap.engine.detectors.threshold import Threshold, calibrate_threshold

__all__ = [
    "CLEAN",
    "Detector",
    "DistanceEvolutionDetector",
    "EntropyDetector",
    "EvolutionConfig",
    "EvolutionTrainReport",
    "Examples",
    "FeatureSqueezer",
    "Features",
    "FileFields",
    "KNNConfig",
    "KNNDetector",
    "LIDConfig",
    "LIDDetector",
    "MahalanobisConfig",
    "MahalanobisDetector",
    "SqueezeConfig",
    "Threshold",
    "calibrate_threshold",
    "collect_features",
    "default_layers",
    "load_detector",
]
