"""Batch jobs on Ray Data: rows of work mapped through a pool of worker actors, by shard.

A job cuts its work into rows, each tagged with its shard and its part (position) in the shard.
`run_shards` maps the rows, after an optional step (`prepare`: reading and decoding files) that
Ray Data fuses into the same stage, through a pool of actors that each load the model once, and
hands each shard's results back, in part order, as soon as all of them are in; the job writes
the shard atomically and a rerun skips what is written. Ray Data restarts an actor whose
process dies and retries its rows, and a shard is handed back once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from frmap.engine.remote import ModelHost, check_positive

# Makes a worker's per-row function once per actor, from the loaded model and the job's arguments.
MakeWorker = Callable[..., Callable[[dict], dict]]


def quiet_ray_data() -> None:
    """Ray Data's progress bars and INFO lines off, for a caller that reports progress by
    shard; its warnings, such as a pool that cannot get its resources, still show."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's notice that they are off
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass(frozen=True)
class WorkerPool(ModelHost):
    """The worker actors of a job, each a `ModelHost` process.

    Attributes:
        workers: how many actors.
    """

    workers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "workers")


class _Actor:
    """A worker actor: torch threads set, the model loaded, the job's function made, once."""

    def __init__(self, pool: WorkerPool, make: MakeWorker, args: tuple) -> None:
        torch.set_num_threads(pool.cpus)
        self.work = make(pool.load(), *args)

    def __call__(self, row: dict) -> dict:
        return self.work(row)


def run_shards(rows: list[dict], pool: WorkerPool, make: MakeWorker, args: tuple = (), *,
               prepare: Callable[..., dict] | None = None,
               prepare_kwargs: dict | None = None) -> Iterator[tuple[int, list[dict]]]:
    """Map `rows` through the pool on the connected Ray cluster; yield `(shard, results)`.

    Args:
        rows: the work, each row a dict with "shard" and "part" keys.
        pool: the worker actors.
        make: called as `make(named_model, *args)` once per actor; the function it returns maps
            a row to a result row that keeps "shard" and "part".
        prepare: a step run on each row before `make`'s function, in the same worker (reading
            files), called with the row and `prepare_kwargs`.

    Yields:
        Each shard once, as soon as all its rows are done, with its results in part order.
    """
    import ray

    if not rows:
        return
    sizes = Counter(int(row["shard"]) for row in rows)
    # about a shard a block (a task): the per-task cost of Ray Data is paid once a shard
    dataset = ray.data.from_items(rows, override_num_blocks=len(sizes))
    resources = {"num_cpus": pool.cpus, "num_gpus": pool.gpus}
    if prepare is not None:
        # the actors' resources: Ray Data fuses the step into the actors' stage, so each worker
        # prepares its own rows (a separate task stage would wait for CPUs the actors hold)
        dataset = dataset.map(prepare, fn_kwargs=prepare_kwargs or {}, **resources)
    # Ray Data's actor pools restart a dead actor and retry its rows without bound by default
    # (max_restarts=-1, max_task_retries=-1; passing them is deprecated since Ray 2.60)
    dataset = dataset.map(_Actor, fn_constructor_args=(pool, make, args),
                          compute=ray.data.ActorPoolStrategy(size=pool.workers), **resources)
    pending: dict[int, dict[int, dict]] = {}
    finished: set[int] = set()
    for row in dataset.iter_rows():
        shard = int(row["shard"])
        if shard in finished:
            continue
        parts = pending.setdefault(shard, {})
        parts[int(row["part"])] = row
        if len(parts) == sizes[shard]:
            del pending[shard]
            finished.add(shard)
            yield shard, [parts[p] for p in sorted(parts)]
