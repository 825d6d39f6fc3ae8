"""Attack sets on Ray Data equal the single-process ones bit for bit; a killed worker and a
killed driver leave every shard written exactly once; the study's scores on Ray equal one
process's to 1e-6 (one local Ray instance, 2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray and subprocesses

import ray  # noqa: E402

from frmap.engine.attacks import PGD, generate, load_adversarial_set  # noqa: E402
from frmap.engine.data import load_digits_split  # noqa: E402
from frmap.engine.data import shards as shard_store  # noqa: E402
from frmap.engine.data.footprints import parse_footprint  # noqa: E402
from frmap.engine.evaluation.study import StudyConfig  # noqa: E402
from frmap.engine.jobs.attack import ray_attacks  # noqa: E402
from frmap.engine.jobs.pool import WorkerPool  # noqa: E402
from frmap.engine.jobs.study import ray_footprint_scores  # noqa: E402
from frmap.engine.models.digits import load_digits_model  # noqa: E402
from frmap.engine.responses import ResponseEngine  # noqa: E402

TIMEOUT = 600
POOL = WorkerPool(workers=2, cpus=1)  # one torch thread each: the reference runs with one too


@pytest.fixture(scope="module")
def ray_address():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_digits_split("test")
    return test.images[:n], test.labels[:n]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".frmap.lock"}


def _frmap(*args: str, threads: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run([sys.executable, "-m", "frmap.engine.cli", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def test_attack_command_on_ray_equals_one_process(ray_address, tmp_path):
    common = ["attack", "--attack", "fgsm", "--limit", "100", "--shard-size", "16"]
    single = _frmap(*common, "--out", str(tmp_path / "single"), threads="1")
    assert single.returncode == 0, single.stderr
    on_ray = _frmap(*common, "--out", str(tmp_path / "ray"), "--ray", "--address", ray_address,
                    "--workers", "2", "--cpus-per-worker", "1")
    assert on_ray.returncode == 0, on_ray.stderr
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")
    assert single.stdout.splitlines()[:2] == on_ray.stdout.splitlines()[:2]  # the stats table
    assert len(load_adversarial_set(tmp_path / "ray").index) > 80


def test_seeded_attack_on_ray_equals_one_process(ray_address, one_thread, tmp_path):
    images, labels = _digits(24)
    attack = PGD(steps=5)  # a random start: each shard's seed must carry over
    kwargs = dict(shard_size=6, seed=3)
    generate(attack, load_digits_model(), images, labels, tmp_path / "single", **kwargs)
    generate(attack, load_digits_model(), images, labels, tmp_path / "ray", **kwargs,
             executor=ray_attacks(POOL))
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")
    other_seed = generate(attack, load_digits_model(), images, labels, tmp_path / "seed4",
                          shard_size=6, seed=4)
    assert not torch.equal(other_seed.images, load_adversarial_set(tmp_path / "ray").images)


def _workers() -> list[int]:
    """The pids of this process's Ray Data worker actors (descendants running `MapWorker`)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    found = []
    for pid in parents:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"MapWorker" in title and mine(pid):
            found.append(pid)
    return found


def test_killed_worker_every_shard_once(ray_address, one_thread, tmp_path):
    images, labels = _digits(100)
    model = load_digits_model()
    reference = generate("fgsm", model, images, labels, tmp_path / "single", shard_size=4)
    executor = ray_attacks(POOL)
    killed: list[int] = []
    arrived: list[int] = []

    def kill_a_worker_after_the_first_shard(attack, shards):
        for k, data in executor(attack, shards):
            arrived.append(k)
            if not killed:
                pids = _workers()
                assert pids, "no worker actor found"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            yield k, data

    result = generate("fgsm", model, images, labels, tmp_path / "ray", shard_size=4,
                      executor=kill_a_worker_after_the_first_shard)
    assert killed and not Path(f"/proc/{killed[0]}").exists()
    assert sorted(arrived) == list(range(25))  # every shard once
    assert result.index.tolist() == sorted(set(result.index.tolist()))
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")
    assert torch.equal(result.images, reference.images)


def test_killed_driver_resumes_the_unfinished_shards(ray_address, one_thread, tmp_path,
                                                     monkeypatch):
    images, labels = _digits(48)
    model = load_digits_model()
    generate("fgsm", model, images, labels, tmp_path / "single", shard_size=8)
    written: list[str] = []
    original = shard_store.atomic_write_bytes

    def killed_after_two_shards(path, data):
        if Path(path).suffix == ".npz":
            if len(written) == 2:
                raise KeyboardInterrupt("driver killed")
            written.append(Path(path).name)
        return original(path, data)

    monkeypatch.setattr(shard_store, "atomic_write_bytes", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        generate("fgsm", model, images, labels, tmp_path / "ray", shard_size=8,
                 executor=ray_attacks(POOL))
    monkeypatch.undo()
    executor = ray_attacks(POOL)
    attacked: list[int] = []

    def counting(attack, shards):
        attacked.extend(s.number for s in shards)
        yield from executor(attack, shards)

    generate("fgsm", model, images, labels, tmp_path / "ray", shard_size=8, executor=counting)
    assert sorted(attacked) == sorted(set(range(6)) - {int(n[6:11]) for n in written})
    assert len(attacked) == 4
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")


def test_study_scores_on_ray_equal_one_process(ray_address, tmp_path):
    images, labels = _digits(100)
    adversarial = generate("fgsm", load_digits_model(), images, labels, tmp_path / "fgsm",
                           shard_size=50).images
    config = StudyConfig(footprints=("square3", "disk2"), batch_size=32)
    engine = ResponseEngine(load_digits_model(), **vars(config.engine))
    footprints = {name: parse_footprint(name) for name in config.footprints}
    score = ray_footprint_scores(POOL, config.engine, config.footprints)
    for x in (images, adversarial):
        expected = engine.footprint_scores(x, footprints)
        got = score(x)
        assert list(got) == list(expected)
        for name in footprints:
            assert got[name].shape == (len(x),)
            assert abs(got[name] - expected[name]).max() <= 1e-6, name


def _numbers(value, path=""):
    """Every number in a JSON document, by its path."""
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else None)
    if items is None:
        return {path: value}
    return {k: v for key, item in items for k, v in _numbers(item, f"{path}/{key}").items()}


def test_evaluate_command_on_ray_equals_one_process(ray_address, tmp_path):
    common = ["evaluate", "--attacks", "fgsm", "--limit", "20", "--footprints", "square3,disk2"]
    single = _frmap(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    on_ray = _frmap(*common, "--out", str(tmp_path / "ray"), "--ray", "--address", ray_address,
                    "--workers", "2")
    assert on_ray.returncode == 0, on_ray.stderr
    for name in ("results.json", "attacks.json"):
        want = _numbers(json.loads((tmp_path / "single" / name).read_text()))
        got = _numbers(json.loads((tmp_path / "ray" / name).read_text()))
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
            else:
                assert got[key] == value, key


def test_bad_ray_arguments_fail_clearly(tmp_path):
    result = _frmap("attack", "--attack", "fgsm", "--out", str(tmp_path / "a"), "--ray",
                    "--workers", "0")
    assert result.returncode == 2
    assert "argument --workers: must be a positive integer, got 0" in result.stderr
    result = _frmap("evaluate", "--ray", "--cpus-per-worker", "-1")
    assert result.returncode == 2 and "argument --cpus-per-worker" in result.stderr
    result = _frmap("score", "--ray", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--ray writes its results to a file: give --out results.jsonl" in result.stderr


def test_unreachable_address_fails_fast(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, message in ((f"127.0.0.1:{port}", "no Ray cluster answers there"),
                             ("headnode", "expected auto or HOST:PORT")):
        result = _frmap("score", "--ray", "--address", address, str(tmp_path),
                        "--out", str(tmp_path / "out.jsonl"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"--address {address}" in result.stderr.replace("'", "")
        assert message in result.stderr
        assert not (tmp_path / "out.jsonl").exists()


def test_bench_scale_quick(tmp_path):
    """The smoke run of `frmap bench scale`: every run measured, Ray's scores equal to the one
    process's (the benchmark checks them against each other and fails otherwise)."""
    out = tmp_path / "scale.json"
    result = _frmap("bench", "scale", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Ray, 2 wkr" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in row["ray"]] == [1, 2]
    for run in [row["single"], *row["ray"]]:
        assert run["end_to_end_images_per_s"] > 0 and run["steady_images_per_s"] > 0
    assert all(r["max_score_difference"] <= 1e-6 for r in row["ray"])
