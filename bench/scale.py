"""`frmap bench scale`: batch screening in one process against Ray Data workers, same run.

On the digits default (the 360 test digits) and on VGG19 at 224 (random weights, random images),
entropy screening of PNG files end to end: the single-process path of `frmap score` (load the
model, then decode and screen batch by batch) against `run_score_job` (`frmap score --ray`) on
a local Ray instance with 1 and 2 worker actors, each taking its share of the CPUs and as many
torch threads. The Ray instance is started once, outside the timings (a running cluster); a
job's time includes starting its actors and loading the model in each. Reported: images/s,
the ratio to the single process, and Ray's overhead per image (its seconds per image less the
single process's).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import frmap.bench.machine as machine
from frmap.engine.data import load_digits_split
from frmap.engine.data.images import load_image
from frmap.engine.detectors import EntropyDetector
from frmap.engine.models import model_identity
from frmap.engine.models.named import load_model
from frmap.engine.screening import Screener


@dataclass(frozen=True)
class Case:
    model: str
    images: int
    batch_size: int


FULL = (Case("digits", 360, 32), Case("vgg19", 24, 8))
QUICK = (Case("digits", 64, 32),)
WORKERS = (1, 2)


def _files(case: Case, folder: Path) -> list[Path]:
    """The case's inputs as PNG files: test digits, or seeded random 224x224 RGB images."""
    if case.model == "digits":
        digits = load_digits_split("test").images[:case.images, 0].numpy()
        arrays = [((d * 255).astype(np.uint8), "L") for d in digits]
    else:
        rng = np.random.default_rng(0)
        arrays = [(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "RGB")
                  for _ in range(case.images)]
    paths = []
    for i, (array, mode) in enumerate(arrays):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(array, mode).save(paths[-1])
    return paths


def _screener(named, batch_size: int) -> Screener:
    """The entropy screener `frmap score` builds without --screener."""
    detector = EntropyDetector("square3", "guided", "conv_max", model_identity(named.model))
    return Screener(named.model, {"entropy": detector}, preprocess=named.preprocess,
                    batch_size=batch_size)


def _single(case: Case, paths: list[Path]) -> tuple[float, list[dict]]:
    """`frmap score`'s single-process path, timed from loading the model."""
    start = time.perf_counter()
    named = load_model(case.model)
    screener = _screener(named, case.batch_size)
    records = []
    for i in range(0, len(paths), case.batch_size):
        batch = torch.stack([load_image(p, named.spec) for p in paths[i:i + case.batch_size]])
        records += screener.records(batch)
    return time.perf_counter() - start, records


def _on_ray(case: Case, paths: list[Path], workers: int, folder: Path) -> tuple[float, list]:
    import json

    import ray

    from frmap.engine.serving.jobs import WorkerPool
    from frmap.engine.serving.score_job import ScoreJob, run_score_job

    named = load_model(case.model)
    screener = _screener(named, case.batch_size).save(folder / f"{case.model}.frmap")
    cpus = int(ray.cluster_resources()["CPU"]) // workers
    job = ScoreJob(WorkerPool(model=case.model, workers=workers, cpus=cpus),
                   batch_size=case.batch_size, shard_groups=4)
    out = folder / f"{case.model}-{workers}.jsonl"
    start = time.perf_counter()
    run_score_job(paths, screener, out, job, spec=named.spec)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in out.read_text().splitlines()]


def _scores(records: list[dict]) -> np.ndarray:
    return np.array([r["scores"]["entropy"] for r in records])


def run(quick: bool = False) -> dict:
    """Measure every case; return the rows and the machine."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError(f"frmap bench scale needs Ray ({err}): pip install 'frmap[serve]'"
                           ) from None
    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in QUICK if quick else FULL:
                folder = Path(tmp) / case.model
                folder.mkdir()
                paths = _files(case, folder)
                seconds, reference = _single(case, paths)
                row = {"model": case.model, "images": case.images,
                       "batch_size": case.batch_size, "single_images_per_s": len(paths) / seconds,
                       "ray": []}
                for workers in WORKERS:
                    ray_seconds, records = _on_ray(case, paths, workers, folder)
                    error = float(np.abs(_scores(records) - _scores(reference)).max())
                    row["ray"].append({
                        "workers": workers, "images_per_s": len(paths) / ray_seconds,
                        "ratio": seconds / ray_seconds,
                        "overhead_ms_per_image": 1e3 * (ray_seconds - seconds) / len(paths),
                        "max_score_difference": error})
                rows.append(row)
    finally:
        ray.shutdown()
    return {"rows": rows, "machine": machine.describe()}


def table(result: dict) -> str:
    """A terminal table of the rows."""
    lines = [machine.summary(result["machine"]),
             f"{'model':8} {'images':>6} {'one process/s':>13} {'workers':>7} {'Ray/s':>7} "
             f"{'ratio':>6} {'overhead ms/image':>17} {'max |diff|':>10}"]
    for r in result["rows"]:
        for w in r["ray"]:
            lines.append(f"{r['model']:8} {r['images']:6d} {r['single_images_per_s']:13.2f} "
                         f"{w['workers']:7d} {w['images_per_s']:7.2f} {w['ratio']:6.2f} "
                         f"{w['overhead_ms_per_image']:17.1f} {w['max_score_difference']:10.2g}")
    return "\n".join(lines)
