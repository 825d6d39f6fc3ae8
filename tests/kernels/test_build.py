"""The build: the C++ extension exists wherever the package was built with it (always in CI)."""

import os

import pytest

from frmap.kernels._backend import _cpu_unavailable_reason


def test_cpu_extension_is_built_in_ci():
    if not os.environ.get("CI"):
        pytest.skip("only CI requires the extension; elsewhere its tests skip without it")
    assert _cpu_unavailable_reason() is None, _cpu_unavailable_reason()
