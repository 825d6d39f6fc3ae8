"""The `frmap` command line: exit codes, JSON output, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from frmap.kernels._backend import _cpu_unavailable_reason


def frmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "frmap.engine.cli", *args], capture_output=True, text=True
    )


def test_help_lists_the_commands():
    result = frmap("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout


def test_unknown_command_fails():
    result = frmap("no-such-command")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr


@pytest.mark.skipif(_cpu_unavailable_reason() is not None, reason="no C++ extension")
def test_bench_entropy_quick_writes_json(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    result = frmap("bench", "entropy", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "x skimage" in result.stdout
    data = json.loads(out.read_text())
    backends = {row["backend"] for row in data["rows"]}
    assert {"skimage", "cpu"} <= backends
    for row in data["rows"]:
        assert row["seconds"] > 0
    assert not list(out.parent.glob(".*.tmp")), "temporary file left behind"
