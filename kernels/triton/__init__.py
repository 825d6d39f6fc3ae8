"""The Triton backend: CUDA tensors, or CPU tensors through the interpreter (TRITON_INTERPRET=1).

Inputs arrive validated and contiguous (see `frmap.kernels.entropy` / `.response`); outputs
stay on the inputs' device.
"""

from .entropy import local_entropy, mean_local_entropy
from .response import response_image, response_score

__all__ = ["local_entropy", "mean_local_entropy", "response_image", "response_score"]
