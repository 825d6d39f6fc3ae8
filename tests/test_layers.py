"""The architecture as code: import contracts, and nothing below the command line prints."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUIET = [*sorted((ROOT / "kernels").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py")),
         *(p for p in sorted((ROOT / "engine").rglob("*.py"))
           if "cli" not in p.relative_to(ROOT / "engine").parts and p.name != "_entry.py")]


def test_import_contracts_hold():
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.fail("lint-imports (import-linter, in the test extra) is not installed")
    run = subprocess.run([linter], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("path", QUIET, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_below_the_cli_prints_or_parses_arguments(path):
    tree = ast.parse(path.read_text(), str(path))
    calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "print"]
    imports = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Import | ast.ImportFrom)
               and any((getattr(node, "module", None) or alias.name) == "argparse"
                       for alias in node.names)]
    assert not calls, f"{path.name} prints at lines {calls}"
    assert not imports, f"{path.name} imports argparse at lines {imports}"
