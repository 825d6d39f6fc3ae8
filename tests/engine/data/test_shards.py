"""The shard store that the adversarial sets and the score jobs share: resumption by checksum,
foreign folders and other jobs refused, one writer at a time."""

from __future__ import annotations

import json

import pytest
from filelock import FileLock

from frmap.engine.data.shards import LOCK, MANIFEST, ShardStore


def _store(folder, **identity) -> ShardStore:
    return ShardStore(folder, {"format": "test/1", "shards": 3, "seed": 0, **identity},
                      suffix=".bin", noun="test job", short="job")


def _fill(store: ShardStore, ks=(0, 1, 2)) -> None:
    with store.writing() as finished:
        for k in ks:
            if not finished[k]:
                store.write(k, f"shard {k}".encode())
        if len(ks) == store.shards:
            store.complete()


def test_a_rerun_keeps_the_finished_shards_and_recomputes_the_corrupt(tmp_path):
    folder = tmp_path / "job"
    _fill(_store(folder), ks=(0, 2))  # a run that stopped with shard 1 missing
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] is False and manifest["shard_sha256"][1] is None
    (folder / "shard-00002.bin").write_bytes(b"shard 2, then damaged")
    mtime = (folder / "shard-00000.bin").stat().st_mtime_ns
    store = _store(folder)
    with store.writing() as finished:
        assert finished == [True, False, False]
        store.write(1, b"shard 1")
        store.write(2, b"shard 2")
        store.complete()
        assert [store.read(k) for k in range(3)] == [b"shard 0", b"shard 1", b"shard 2"]
    assert (folder / "shard-00000.bin").stat().st_mtime_ns == mtime
    assert json.loads((folder / MANIFEST).read_text())["complete"] is True


def test_missing_shards_leave_the_job_incomplete(tmp_path):
    store = _store(tmp_path / "job")
    with pytest.raises(RuntimeError, match=r"shards \[1\] were not written"):
        with store.writing():
            store.write(0, b"a")
            store.write(2, b"c")
            store.complete()
    with pytest.raises(ValueError, match="shard-00001.bin: missing, truncated or corrupt"):
        store.read(1)


def test_another_job_and_foreign_files_are_refused_and_kept(tmp_path):
    folder = tmp_path / "job"
    _fill(_store(folder))
    with pytest.raises(ValueError, match="holds another test job \\(differs in seed\\)"):
        with _store(folder, seed=1).writing():
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no test job"):
        with _store(mine).writing():
            pass
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{MANIFEST}: not a manifest of test jobs"):
        with _store(folder).writing():
            pass


def test_a_second_writer_is_refused(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    with FileLock(folder / LOCK):
        with pytest.raises(ValueError, match="another frmap run is writing this job"):
            with _store(folder).writing():
                pass
    assert sorted(p.name for p in folder.iterdir()) == [LOCK]
