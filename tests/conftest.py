"""Test session setup: Triton kernels run through the interpreter where there is no GPU."""

import os

import torch

# Must happen before triton is first imported: without a GPU, Triton kernels run on CPU tensors
# through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
