"""`frmap score --ray`: Ray Data output equal to one process, bad files recorded, a killed driver
resumed without recomputing finished shards (local Ray instances, 2 CPUs, bounded)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray and subprocesses

from frmap.engine.data import load_digits_split  # noqa: E402

TIMEOUT = 600


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    test = load_digits_split("test")
    for i in range(40):
        image = (test.images[i, 0].numpy() * 255).astype(np.uint8)
        Image.fromarray(image, "L").save(root / f"d{i:03d}_{int(test.labels[i])}.png")
    (root / "d100_0.png").write_bytes(b"not an image")
    return root


def frmap(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frmap.engine.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "RAY_ADDRESS": ""})


def _ray_args(folder, out) -> list[str]:
    return ["score", "--ray", "--workers", "2", "--num-cpus", "2", "--batch-size", "4",
            "--shard-groups", "2", "--out", str(out), str(folder)]


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "results.jsonl"
    result = frmap(*_ray_args(folder, out))
    return result, out


def test_ray_output_equals_one_process_and_records_bad_files(folder, uninterrupted):
    result, out = uninterrupted
    assert result.returncode == 1, result.stderr  # one bad file
    assert "41 inputs, 1 failed, shards computed 6, reused 0" in result.stderr
    single = frmap("score", "--batch-size", "4", str(folder))
    assert single.returncode == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == sorted(str(p) for p in folder.iterdir())
    bad = [line for line in lines if "error" in line]
    assert len(bad) == 1 and "d100_0.png: unreadable or corrupt" in bad[0]["error"]
    good = [line for line in lines if "error" not in line]
    assert good == [json.loads(line) for line in single.stdout.splitlines()]


def test_killed_driver_resumes_without_recomputing(folder, uninterrupted, tmp_path):
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "frmap.engine.cli", *_ray_args(folder, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.monotonic() + TIMEOUT
    for line in proc.stderr:
        if "frmap score: shard 2/6" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    shards = out.with_name(out.name + ".shards")
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.jsonl")}
    assert len(finished) >= 2 and not out.exists()
    rerun = frmap(*_ray_args(folder, out))
    assert rerun.returncode == 1, rerun.stderr
    assert f"reused {len(finished)}" in rerun.stderr
    assert all(shards.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())
    assert out.read_text() == uninterrupted[1].read_text()


def test_a_foreign_shard_folder_is_refused(folder, tmp_path):
    out = tmp_path / "results.jsonl"
    out.with_name("results.jsonl.shards").mkdir()
    (tmp_path / "results.jsonl.shards" / "notes.txt").write_text("mine")
    result = frmap(*_ray_args(folder, out))
    assert result.returncode == 1 and "is not empty and holds no frmap score job" in result.stderr
    assert (tmp_path / "results.jsonl.shards" / "notes.txt").read_text() == "mine"
