"""The scoring half of `frmap evaluate --ray`: the study's entropy scores on Ray Data workers.

The images are cut into the engine's batches in order, one row each; the pool's actors (each
builds the response engine on its model once) score a batch per call with
`ResponseEngine.footprint_scores`, the very batches the study scores in one process, and the
scores come back in input order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from frmap.engine.data.footprints import parse_footprint
from frmap.engine.jobs.pool import WorkerPool, run_shards
from frmap.engine.models.named import NamedModel
from frmap.engine.responses import EngineConfig, ResponseEngine


def _scoring(named: NamedModel, config: EngineConfig,
             footprints: tuple[str, ...]) -> Callable[[dict], dict]:
    """A worker's work: one batch's scores per call, [footprints, n], in `footprints` order."""
    engine = ResponseEngine(named.model.eval(), **asdict(config))
    shapes = {name: parse_footprint(name) for name in footprints}

    def work(row: dict) -> dict:
        scores = engine.footprint_scores(torch.tensor(row["images"]), shapes)
        return {"shard": row["shard"], "part": 0,
                "scores": np.stack([scores[name] for name in footprints])}

    return work


def ray_footprint_scores(pool: WorkerPool, config: EngineConfig, footprints: tuple[str, ...]
                         ) -> Callable[[torch.Tensor], dict[str, np.ndarray]]:
    """A study scorer (`run_study(scorer=...)`) that scores on the pool's actors."""

    def score(images: torch.Tensor) -> dict[str, np.ndarray]:
        step = config.batch_size
        rows = [{"shard": k, "part": 0, "images": images[start:start + step].numpy()}
                for k, start in enumerate(range(0, len(images), step))]
        parts = dict(run_shards(rows, pool, _scoring, (config, footprints)))
        if not parts:
            return {name: np.zeros(0) for name in footprints}
        scores = np.concatenate([parts[k][0]["scores"] for k in sorted(parts)], axis=1)
        return dict(zip(footprints, scores, strict=True))

    return score
