"""Adversarial sets on Ray Data (`frmap attack --ray`): the shards of `generate`, attacked by
worker actors that each load the model once.

`generate` keeps the set, its manifest, resumption and atomic writes; `ray_attacks` is the
executor it hands the missing shards to. Every shard is attacked by `attack_shard` with the
seed `generate` derived from the set's seed and the shard's number (a function of the inputs'
positions, never of the worker or the number of workers), so the set equals the one a single
process writes, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from frmap.engine.attacks.base import Attack
from frmap.engine.attacks.sets import AttackShard, ShardExecutor, attack_shard
from frmap.engine.jobs.pool import WorkerPool, run_shards
from frmap.engine.models.named import NamedModel


def _attacker(named: NamedModel, attack: Attack) -> Callable[[dict], dict]:
    """A worker's work: one shard per call, on the classifier loaded once."""

    def work(row: dict) -> dict:
        shard = AttackShard(int(row["shard"]), int(row["start"]),
                            torch.tensor(row["images"]), torch.tensor(row["labels"]),
                            int(row["seed"]), str(row["made_by"]))
        return {"shard": shard.number, "part": 0,
                "data": attack_shard(attack, named.classifier, shard)}

    return work


def ray_attacks(pool: WorkerPool) -> ShardExecutor:
    """An executor for `generate` that attacks the shards on the pool (connected Ray cluster)."""

    def execute(attack: Attack, shards: list[AttackShard]) -> Iterator[tuple[int, bytes]]:
        rows = [{"shard": s.number, "part": 0, "start": s.start, "images": s.images.numpy(),
                 "labels": s.labels.numpy(), "seed": s.seed, "made_by": s.made_by}
                for s in shards]
        for k, (result,) in run_shards(rows, pool, _attacker, (attack,)):
            yield k, bytes(result["data"])

    return execute
