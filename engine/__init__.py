"""frmap.engine: the pipeline from images to decisions.

    image -> models (the CNN) -> responses (what a ReLU rule back-propagates to the image)
          -> frmap.kernels (response image, local entropy) -> detectors (score, threshold)
          -> evaluation (metrics, study, comparison) -> cli

Attacks craft the adversarial images the detectors are measured on; data reads image files and
the digits, and writes files atomically. The public names below are loaded on first use (PEP
562), so that importing a module of the package (the `frmap` command's entry point) does not
import torch before it can say that the engine extra is missing.
"""

from __future__ import annotations

import importlib

# Public name -> the subpackage that defines it.
_EXPORTS = {
    **dict.fromkeys(("ATTACKS", "make_attack", "run_attack"), "attacks"),
    **dict.fromkeys(("DistanceEvolutionDetector", "EntropyDetector", "FeatureSqueezer",
                     "KNNDetector", "load_detector"), "detectors"),
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "VGG_ARCHS", "Normalized", "load_vgg",
                     "load_weights", "model_identity"), "models"),
    **dict.fromkeys(("PATHS", "PRECISIONS", "TARGETS", "EngineConfig", "ResponseEngine"),
                     "responses"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
