"""The `frmap` command's entry point: without the engine extra, say what to install and exit 2.

It checks the engine's dependencies before importing the command-line module, so a core install
(numpy and the entropy op only) gets one line instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

# The engine extra's import names and the distributions that provide them.
ENGINE_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "foolbox": "foolbox",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "skimage": "scikit-image",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "filelock": "filelock",
}


def missing_engine_packages() -> list[str]:
    """The distributions of the engine extra that are not installed."""
    return [dist for module, dist in ENGINE_MODULES.items()
            if importlib.util.find_spec(module) is None]


def main() -> None:
    if missing := missing_engine_packages():
        print(f"frmap: the command needs the engine extra ({', '.join(missing)} missing); "
              "install it with: pip install 'frmap[engine]'", file=sys.stderr)
        sys.exit(2)
    from frmap.engine.cli import main as cli_main

    sys.exit(cli_main())
