"""Batch screening on Ray Data (`frmap score --ray`): resumable, exactly once, equal to one process.

The inputs are cut into groups of `batch_size` files in input order, the groups into shards of
`shard_groups` groups. The pool's actors (each loads the model and the screener once) read,
decode and screen a group per call, in one pass, exactly as
`frmap score` batches the same files in one process, so the results are the same bit for bit.
The driver writes each shard as soon as all its groups are in, atomically, into a shard store
(`<out>.shards/shard-NNNNN.jsonl`, `frmap.engine.data.shards`, the one the adversarial sets use);
a rerun after any failure skips the finished shards (their checksums hold), and the
merged output, one JSON line per input in input order (bad files as `{"path", "error"}`), holds
every input exactly once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmap.engine.data.files import atomic_write_bytes
from frmap.engine.data.images import ImageFileError, ImageSpec, load_image
from frmap.engine.data.shards import ShardStore
from frmap.engine.jobs.pool import WorkerPool, run_shards
from frmap.engine.models.named import NamedModel
from frmap.engine.remote import check_positive, load_screener


@dataclass(frozen=True)
class ScoreJob:
    """A batch screening job.

    Attributes:
        pool: the worker actors and their classifier.
        batch_size: files per model pass (the same groups as `frmap score --batch-size`).
        shard_groups: groups per shard (the unit of resumption).
    """

    pool: WorkerPool
    batch_size: int = 32
    shard_groups: int = 8

    def __post_init__(self) -> None:
        check_positive(self, "batch_size", "shard_groups")


@dataclass(frozen=True)
class ScoreReport:
    """What a job did: inputs, bad files, shards computed now and found finished."""

    inputs: int
    failed: int
    shards: int
    computed: list[int]
    reused: list[int]


def _decode_group(row: dict, spec: ImageSpec) -> dict:
    """Read one group's files: stacked images of the good ones, an error per bad one."""
    images, errors = [], []
    for path in row["paths"]:
        try:
            images.append(load_image(Path(path), spec).numpy())
            errors.append("")
        except ImageFileError as err:
            errors.append(str(err))
    shape = images[0].shape if images else (0,)
    return {**row, "errors": errors,
            "images": np.stack(images) if images else np.zeros((0, *shape), np.float32)}


class _Screening:
    """A worker's work: the screener loaded once on the model; screens one group per call."""

    def __init__(self, named: NamedModel, screener: bytes, batch_size: int) -> None:
        self.screener = load_screener(screener, named, batch_size)

    def __call__(self, row: dict) -> dict:
        records, good = [], iter(())
        if len(row["images"]):
            good = iter(self.screener.records(torch.tensor(row["images"])))
        for path, error in zip(row["paths"], row["errors"], strict=True):
            records.append(json.dumps({"path": path, "error": error}) if error
                           else json.dumps({"path": path, **next(good)}))
        return {"shard": row["shard"], "part": row["part"], "lines": records}


def run_score_job(paths: Sequence[Path], screener: Path, out: Path, job: ScoreJob, *,
                  spec: ImageSpec,
                  on_shard: Callable[[int, int], None] | None = None) -> ScoreReport:
    """Screen `paths` on the connected Ray cluster into `out` (JSON lines, input order).

    Args:
        paths: the image files, in order.
        screener: the screener file.
        out: the merged output; the shards go to `<out>.shards/` (a `ShardStore`).
        job: the workers, batching and sharding.
        spec: how the model takes image files.
        on_shard: called with (finished shards, all shards) after each shard is written.

    Raises:
        ValueError: a shard folder left by a job over other inputs, screener or settings, or
            holding files frmap did not write; or another run writing it.
    """
    data = screener.read_bytes()
    groups = [list(map(str, paths[i:i + job.batch_size]))
              for i in range(0, len(paths), job.batch_size)]
    per_shard = job.shard_groups
    pool = job.pool
    identity = {"format": "frmap.score-job/2", "shards": -(-len(groups) // per_shard),
                "inputs_sha256": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest(),
                "screener_sha256": hashlib.sha256(data).hexdigest(),
                "model": pool.model, "weights": pool.weights, "seed": pool.seed,
                "batch_size": job.batch_size, "shard_groups": per_shard}
    store = ShardStore(out.with_name(out.name + ".shards"), identity, suffix=".jsonl",
                       noun="frmap score job", short="job")
    with store.writing() as finished:
        reused = [k for k in range(store.shards) if finished[k]]
        todo = [k for k in range(store.shards) if not finished[k]]
        done = len(reused)
        rows = [{"shard": g // per_shard, "part": g % per_shard, "paths": groups[g]}
                for k in todo
                for g in range(k * per_shard, min((k + 1) * per_shard, len(groups)))]
        for k, results in run_shards(rows, pool, _Screening, (data, job.batch_size),
                                     prepare=_decode_group, prepare_kwargs={"spec": spec}):
            store.write(k, "".join(str(line) + "\n" for row in results
                                   for line in row["lines"]).encode())
            done += 1
            if on_shard is not None:
                on_shard(done, store.shards)
        store.complete()
        lines = [line for k in range(store.shards)
                 for line in store.read(k).decode().splitlines()]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode() if lines else b"")
    failed = sum("error" in json.loads(line) for line in lines)
    return ScoreReport(len(paths), failed, store.shards, todo, reused)
