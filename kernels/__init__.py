"""frmap.kernels: the fast ops behind the feature responses and their entropy score.

Every op validates its input, picks a backend (`cpu`: the C++ kernels; `triton`: CUDA tensors;
for the entropy ops `reference`: scikit-image/numpy/PIL; for the ReLU rules and pooling
`torch`: eager torch ops) and returns the same kind of array it was given.
"""

from ._arrays import footprint_array as check_footprint
from ._backend import BACKENDS, get_num_threads, resolve_backend, set_num_threads
from .entropy import local_entropy, mean_local_entropy
from .pooling import POOL_BACKENDS, max_pool_offsets, max_unpool_offsets
from .relu_rules import (
    RULE_BACKENDS,
    RULES,
    ReLUMask,
    ReLURule,
    ReLURuleFunction,
    relu_backward,
    relu_forward,
    relu_rule,
    swap_relus,
)
from .response import response_score, response_to_image

__all__ = [
    "BACKENDS",
    "POOL_BACKENDS",
    "RULES",
    "RULE_BACKENDS",
    "ReLUMask",
    "ReLURule",
    "ReLURuleFunction",
    "check_footprint",
    "get_num_threads",
    "local_entropy",
    "max_pool_offsets",
    "max_unpool_offsets",
    "mean_local_entropy",
    "relu_backward",
    "relu_forward",
    "relu_rule",
    "resolve_backend",
    "response_score",
    "response_to_image",
    "set_num_threads",
    "swap_relus",
]
