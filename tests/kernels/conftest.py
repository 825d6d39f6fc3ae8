"""Fixtures of the torch-side kernel tests: where the Triton kernels run."""

import pytest
import torch

from frmap.kernels._dispatch import interpreting


@pytest.fixture(params=[
    pytest.param("cpu", marks=[
        pytest.mark.triton_interpret,
        pytest.mark.skipif(not interpreting() or torch.cuda.is_available(),
                           reason="CPU tensors go to Triton only through the interpreter, and "
                                  "only where there is no GPU"),
    ]),
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]),
])
def triton_device(request: pytest.FixtureRequest) -> str:
    """The device of the tensors given to the triton backend: CUDA tensors on a GPU host, CPU
    tensors through the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) elsewhere."""
    return request.param
