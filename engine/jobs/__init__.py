"""Batch jobs on Ray Data (`--ray`): score, attack and study work mapped through a pool of worker
actors, by shard, with results equal to one process's."""

from frmap.engine.jobs.pool import WorkerPool, quiet_ray_data, run_shards

__all__ = ["WorkerPool", "quiet_ray_data", "run_shards"]
