"""`frmap bench scale`: batch screening in one process against Ray Data workers, same run.

On the digits default (all 1797 digits) and on VGG19 at 224 (random weights, random images),
entropy screening of PNG files end to end: the single-process path of `frmap score` (load the
model, then decode and screen batch by batch) against `run_score_job` (`frmap score --ray`) on
a local Ray instance with 1 and 2 worker actors, each taking its share of the CPUs and as many
torch threads. The Ray instance is started once, outside the timings (a running cluster).
Each is run over all the images and over the first batch alone, the best of two runs each.
Reported: images/s end to end (from loading the model; for Ray from submitting the job, which
starts the actors and loads the model in each); images/s in the steady state (the images beyond
the first batch over the difference in time between the two runs, which cancels the start-up);
the steady-state ratio to the one process; Ray's overhead per image in the steady state (its
seconds per image less the one process's); and the fixed start-up (end-to-end seconds less the
steady state's time for all the images).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
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


FULL = (Case("digits", 1797, 32), Case("vgg19", 32, 8))
QUICK = (Case("digits", 64, 32),)
WORKERS = (1, 2)
REPEATS = 2  # the best of two runs of each: the machine may be shared


def _files(case: Case, folder: Path) -> list[Path]:
    """The case's inputs as PNG files: digits, or seeded random 224x224 RGB images."""
    if case.model == "digits":
        splits = ("train", "calibration", "test")
        digits = torch.cat([load_digits_split(s).images for s in splits])[:case.images, 0].numpy()
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


def _single(case: Case, paths: list[Path], folder: Path) -> tuple[float, list[dict]]:
    """`frmap score`'s single-process path, timed from loading the model."""
    start = time.perf_counter()
    named = load_model(case.model)
    screener = _screener(named, case.batch_size)
    records = []
    for i in range(0, len(paths), case.batch_size):
        batch = torch.stack([load_image(p, named.spec) for p in paths[i:i + case.batch_size]])
        records += screener.records(batch)
    return time.perf_counter() - start, records


def _on_ray(case: Case, paths: list[Path], folder: Path, workers: int) -> tuple[float, list]:
    """`run_score_job`, timed from submitting the job (actors started, models loaded)."""
    import json

    import ray

    from frmap.engine.serving.jobs import WorkerPool
    from frmap.engine.serving.score_job import ScoreJob, run_score_job

    named = load_model(case.model)
    screener = _screener(named, case.batch_size).save(folder / f"{case.model}.frmap")
    cpus = int(ray.cluster_resources()["CPU"]) // workers
    job = ScoreJob(WorkerPool(model=case.model, workers=workers, cpus=cpus),
                   batch_size=case.batch_size, shard_groups=1)
    out = Path(tempfile.mkdtemp(dir=folder)) / "results.jsonl"  # a new job: nothing to resume
    start = time.perf_counter()
    run_score_job(paths, screener, out, job, spec=named.spec)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in out.read_text().splitlines()]


def _measure(run, case: Case, paths: list[Path], folder: Path) -> tuple[dict, list[dict]]:
    """End-to-end images/s over all `paths`; the steady state and the fixed start-up from the
    difference to a run over the first batch alone."""
    first = min(run(case, paths[:case.batch_size], folder)[0] for _ in range(REPEATS))
    seconds, records = min((run(case, paths, folder) for _ in range(REPEATS)),
                           key=lambda timed: timed[0])
    # NaN where the work beyond the first batch is lost in the start-up's noise
    steady = (len(paths) - case.batch_size) / (seconds - first) if seconds > first else math.nan
    return {"end_to_end_images_per_s": len(paths) / seconds, "steady_images_per_s": steady,
            "startup_s": seconds - len(paths) / steady}, records


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
                single, reference = _measure(_single, case, paths, folder)
                row = {"model": case.model, "images": case.images,
                       "batch_size": case.batch_size, "single": single, "ray": []}
                for workers in WORKERS:
                    rates, records = _measure(partial(_on_ray, workers=workers), case, paths,
                                              folder)
                    error = float(np.abs(_scores(records) - _scores(reference)).max())
                    if error > 1e-6:
                        raise RuntimeError(f"{case.model}, {workers} Ray worker(s): scores differ "
                                           f"from the one process's by up to {error:.3g}")
                    rows_per_s = rates["steady_images_per_s"]
                    row["ray"].append({
                        "workers": workers, **rates,
                        "ratio": rows_per_s / single["steady_images_per_s"],
                        "overhead_ms_per_image": 1e3 * (1 / rows_per_s
                                                        - 1 / single["steady_images_per_s"]),
                        "max_score_difference": error})
                rows.append(row)
    finally:
        ray.shutdown()
    return {"rows": rows, "machine": machine.describe()}


def table(result: dict) -> str:
    """A terminal table of the rows: one process, then Ray with 1 and 2 workers."""
    lines = [machine.summary(result["machine"]),
             f"{'model':7} {'images':>6} {'run':>12} {'end-to-end/s':>12} {'steady/s':>9} "
             f"{'ratio':>6} {'overhead ms/img':>15} {'start-up s':>10} {'max |diff|':>10}"]
    for r in result["rows"]:
        s = r["single"]
        lines.append(f"{r['model']:7} {r['images']:6d} {'one process':>12} "
                     f"{s['end_to_end_images_per_s']:12.2f} {s['steady_images_per_s']:9.2f} "
                     f"{1:6.2f} {'':>15} {s['startup_s']:10.1f}")
        for w in r["ray"]:
            lines.append(f"{'':7} {'':6} {'Ray, ' + str(w['workers']) + ' wkr':>12} "
                         f"{w['end_to_end_images_per_s']:12.2f} {w['steady_images_per_s']:9.2f} "
                         f"{w['ratio']:6.2f} {w['overhead_ms_per_image']:15.1f} "
                         f"{w['startup_s']:10.1f} {w['max_score_difference']:10.2g}")
    return "\n".join(lines)
