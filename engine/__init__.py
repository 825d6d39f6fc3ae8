"""frmap.engine: feature responses, scores, detectors, attacks, evaluation and the CLI.

The public names below are loaded on first use (PEP 562), so that importing a module of the
package (the `frmap` command's entry point) does not import torch before it can say that the
engine extra is missing.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "VGG_ARCHS", "Normalized", "load_vgg",
                     "load_weights"), "models"),
    **dict.fromkeys(("PATHS", "TARGETS", "EngineConfig", "ResponseEngine"), "responses"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
