"""The core install: numpy-only imports, clear messages for what an extra would bring.

Each check runs in a fresh interpreter, so that what the test session imported does not count;
`sys.modules[name] = None` makes a package look uninstalled there.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.needs_extension
def test_numpy_path_imports_neither_torch_nor_triton():
    result = python(
        "import sys\n"
        "import numpy as np\n"
        "import frmap.kernels as K\n"
        "image = np.arange(64, dtype=np.uint8).reshape(8, 8)\n"
        "K.local_entropy(image, np.ones((3, 3)))\n"
        "K.mean_local_entropy(image, np.ones((3, 3)), backend='reference')\n"
        "K.response_score(np.ones((1, 3, 8, 8)), np.ones((3, 3)))\n"
        "K.response_to_image(np.ones((1, 3, 8, 8)), backend='reference')\n"
        "print(sorted({'torch', 'triton'} & set(sys.modules)))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_torch_names_without_torch_name_the_extra():
    result = python(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import frmap.kernels as K\n"
        "K.ReLURule\n"
    )
    assert result.returncode == 1
    assert "ImportError: frmap.kernels.ReLURule needs torch" in result.stderr
    assert "pip install 'frmap[engine]'" in result.stderr


@pytest.mark.slow
def test_reference_backend_without_scikit_image_names_the_extra():
    result = python(
        "import sys\n"
        "sys.modules['skimage'] = None\n"
        "import numpy as np\n"
        "import frmap.kernels as K\n"
        "K.local_entropy(np.zeros((4, 4), np.uint8), np.ones((3, 3)), backend='reference')\n"
    )
    assert result.returncode == 1
    assert ("FrmapError: the reference backend is unavailable: it needs scikit-image"
            in result.stderr)
    assert "pip install 'frmap[engine]'" in result.stderr


@pytest.mark.slow
def test_command_without_the_engine_extra_says_what_to_install():
    result = python(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from frmap.engine._entry import main\n"
        "main()\n"
    )
    assert result.returncode == 2
    assert re.fullmatch(r"frmap: the command needs the engine extra \((.+, )?torch(, .+)? "
                        r"missing\); install it with: pip install 'frmap\[engine\]'\n",
                        result.stderr), result.stderr


@pytest.mark.slow
def test_installed_command_in_the_core_install():
    """The `frmap` script itself, where the engine extra is not installed (the core CI run)."""
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: tests/engine/cli/test_cli.py runs the command")
    script = Path(sys.executable).with_name("frmap")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'frmap[engine]'" in result.stderr
    assert "Traceback" not in result.stderr
