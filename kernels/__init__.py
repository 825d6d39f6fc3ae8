"""frmap.kernels: the fast ops behind the feature responses and their entropy score.

Every op validates its input, picks a backend by the one policy of `frmap.kernels._dispatch`
(`cpu`: the C++ kernels; `triton`: CUDA tensors; for the entropy ops `reference`:
scikit-image/numpy/PIL; for the ReLU rules and pooling `torch`: eager torch ops) and returns the
same kind of array it was given (the entropy ops: numpy, torch, or any DLPack array such as
CuPy's). On tensors the ops' kernels are registered torch operators (`frmap.kernels.torch_ops`),
so that torch.compile and torch.export take them.

`import frmap.kernels` needs numpy only: the entropy and response ops run on numpy arrays with
the C++ backend where torch is not installed. The ReLU rules and pooling work on torch tensors;
their names are attributes loaded on first use (PEP 562), which imports torch then and raises
an ImportError naming the extra to install where it is missing.
"""

from __future__ import annotations

import importlib

from ._arrays import footprint_array as check_footprint
from ._constants import RULES
from ._dispatch import BACKENDS, POOL_BACKENDS, RULE_BACKENDS, resolve_backend
from ._threads import get_num_threads, set_num_threads
from .denoise import nl_means
from .entropy import local_entropy, mean_local_entropy
from .errors import FrmapError
from .scoring import response_score, response_to_image

# The torch-only names and the module that defines each.
_TORCH_NAMES = {
    **dict.fromkeys(("ReLUMask", "ReLURule", "ReLURuleFunction", "relu_backward", "relu_forward",
                     "relu_rule", "swap_relus"), "relu_rules"),
    **dict.fromkeys(("max_pool_offsets", "max_unpool_offsets"), "pooling"),
}

__all__ = [
    "BACKENDS",
    "FrmapError",
    "POOL_BACKENDS",
    "RULES",
    "RULE_BACKENDS",
    "check_footprint",
    "get_num_threads",
    "local_entropy",
    "mean_local_entropy",
    "nl_means",
    "resolve_backend",
    "response_score",
    "response_to_image",
    "set_num_threads",
    *_TORCH_NAMES,
]


def __getattr__(name: str) -> object:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_TORCH_NAMES[name]}")
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise ImportError(f"frmap.kernels.{name} needs torch, which is not installed: install "
                          "frmap's engine extra, pip install 'frmap[engine]'") from err
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_TORCH_NAMES})
