"""Test session setup: the Triton interpreter where there is no GPU; the C++ extension marker.

Imports torch only where it is installed: the tests in tests/core run without it.
"""

import importlib.util
import os

import pytest

from frmap.kernels._dispatch import unavailable_reason

if importlib.util.find_spec("torch") is not None:
    import torch

    # Must happen before triton is first imported: without a GPU, Triton kernels run on CPU
    # tensors through the interpreter.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests that need the C++ extension skip where it is not built, and fail in CI (CI=true),
    which always builds it."""
    if item.get_closest_marker("needs_extension") and (reason := unavailable_reason("cpu")):
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI builds the C++ extension, but {reason}", pytrace=False)
        pytest.skip(reason)
