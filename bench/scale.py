"""`frmap bench scale`: batch screening in one process against Ray Data workers, same run.

On the digits default (all 1797 digits) and on VGG19 at 224 (random weights, random images),
entropy screening of PNG files end to end: the single-process path of `frmap score` (load the
model, then decode and screen batch by batch, in a process of its own) against
`run_score_job` (`frmap score --ray`) on a local Ray instance with 1 and 2 worker actors, each
taking its share of the CPUs and as many torch threads. The Ray instance is started once,
outside the timings (a running cluster). The runs take turns (one process, 1 worker, 2
workers; three rounds), so that a shared machine's load falls on all of them alike, and each
figure is the best of its three.
Reported: images/s end to end (from loading the model; for Ray from submitting the job, which
starts the actors and loads the model in each); images/s in the steady state, from the times
the batches (for Ray the shards) finish: the slope of a line fitted to the images done against
those times from the `w`-th on, where `w` is the number of workers, whose first batches finish
together; the steady-state ratio to the one process; Ray's overhead per image in the steady
state (its seconds per image less the one process's); and the fixed start-up (end-to-end
seconds less the steady state's time for all the images).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
    shard_groups: int  # batches a shard: the times of finished shards give the steady state


FULL = (Case("digits", 1797, 32, 8), Case("vgg19", 48, 8, 1))
QUICK = (Case("digits", 256, 32, 1),)
WORKERS = (1, 2)
ROUNDS = 3  # the best of three runs of each, taking turns: the machine may be shared


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


def _single(case: Case, paths: list[Path], folder: Path) -> tuple[dict, list[dict]]:
    """`frmap score`'s single-process path, timed from loading the model."""
    start = time.perf_counter()
    named = load_model(case.model)
    screener = _screener(named, case.batch_size)
    batches = [paths[i:i + case.batch_size] for i in range(0, len(paths), case.batch_size)]
    records, finished = [], []
    for batch in batches:
        records += screener.records(torch.stack([load_image(p, named.spec) for p in batch]))
        finished.append(time.perf_counter() - start)
    return _rates([len(b) for b in batches], finished, 1), records


def _single_apart(case: Case, paths: list[Path], folder: Path) -> tuple[dict, list[dict]]:
    """`_single` in a fresh process without Ray, as `frmap score` runs (a driver's Ray threads
    would compete with torch's)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as apart:
        return apart.submit(_single, case, paths, folder).result()


def _on_ray(case: Case, paths: list[Path], folder: Path, workers: int) -> tuple[dict, list]:
    """`run_score_job`, timed from submitting the job (actors started, models loaded)."""
    import ray

    from frmap.engine.jobs.pool import WorkerPool
    from frmap.engine.jobs.score import ScoreJob, run_score_job

    named = load_model(case.model)
    screener = _screener(named, case.batch_size).save(folder / f"{case.model}.frmap")
    cpus = int(ray.cluster_resources()["CPU"]) // workers
    job = ScoreJob(WorkerPool(model=case.model, workers=workers, cpus=cpus),
                   batch_size=case.batch_size, shard_groups=case.shard_groups)
    out = Path(tempfile.mkdtemp(dir=folder)) / "results.jsonl"  # a new job: nothing to resume
    finished: list[float] = []
    start = time.perf_counter()
    run_score_job(paths, screener, out, job, spec=named.spec,
                  on_shard=lambda done, shards: finished.append(time.perf_counter() - start))
    seconds = time.perf_counter() - start
    per_shard = case.batch_size * case.shard_groups
    rates = _rates([len(paths[i:i + per_shard]) for i in range(0, len(paths), per_shard)],
                   finished, workers)
    rates["end_to_end_images_per_s"] = len(paths) / seconds  # the merge after the last shard
    return rates, [json.loads(line) for line in out.read_text().splitlines()]


def _rates(sizes: list[int], finished: list[float], workers: int) -> dict:
    """End-to-end and steady-state images/s and the start-up, from the sizes of the batches
    (or shards) and the times (s) they finished, with `workers` working at once: the steady
    state is the slope of the images done against time from the `workers`-th on (the workers'
    first batches finish together)."""
    done = np.cumsum(sizes)[workers - 1:]
    times = np.asarray(finished)[workers - 1:]
    if len(times) > 2 and np.ptp(times) > 0:
        steady = float(np.polyfit(times, done, 1)[0])
    else:  # too few batches to see a steady state
        steady = math.nan
    images = sum(sizes)
    return {"end_to_end_images_per_s": images / finished[-1], "steady_images_per_s": steady,
            "startup_s": finished[-1] - images / steady}


def _best(runs: list[dict]) -> dict:
    """The best of each figure over the runs (the least start-up)."""
    return {"end_to_end_images_per_s": max(r["end_to_end_images_per_s"] for r in runs),
            "steady_images_per_s": max(r["steady_images_per_s"] for r in runs),
            "startup_s": min(r["startup_s"] for r in runs)}


def _scores(records: list[dict]) -> np.ndarray:
    return np.array([r["scores"]["entropy"] for r in records])


def run(quick: bool = False) -> dict:
    """Measure every case; return the rows and the machine."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError(f"frmap bench scale needs Ray ({err}): pip install 'frmap[serve]'"
                           ) from None
    from frmap.engine.jobs.pool import quiet_ray_data

    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    quiet_ray_data()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in QUICK if quick else FULL:
                folder = Path(tmp) / case.model
                folder.mkdir()
                rows.append(_case(case, _files(case, folder), folder, ROUNDS if not quick else 1))
    finally:
        ray.shutdown()
    return {"rows": rows, "machine": machine.describe()}


def _case(case: Case, paths: list[Path], folder: Path, rounds: int) -> dict:
    """One case's row: the one process and each number of workers, taking turns."""
    runs = {"single": _single_apart, **{w: partial(_on_ray, workers=w) for w in WORKERS}}
    timed: dict = {name: [] for name in runs}
    reference = None
    for _ in range(rounds):
        for name, run in runs.items():
            rates, records = run(case, paths, folder)
            timed[name].append(rates)
            if name == "single":
                reference = _scores(records)
                continue
            error = float(np.abs(_scores(records) - reference).max())
            if error > 1e-6:
                raise RuntimeError(f"{case.model}, {name} Ray worker(s): scores differ from the "
                                   f"one process's by up to {error:.3g}")
            rates["max_score_difference"] = error
    single = _best(timed["single"])
    row = {"model": case.model, "images": case.images, "batch_size": case.batch_size,
           "rounds": rounds, "single": single, "ray": []}
    for workers in WORKERS:
        best = _best(timed[workers])
        rate = best["steady_images_per_s"]
        row["ray"].append({
            "workers": workers, **best,
            "ratio": rate / single["steady_images_per_s"],
            "overhead_ms_per_image": 1e3 * (1 / rate - 1 / single["steady_images_per_s"]),
            "max_score_difference": max(r["max_score_difference"] for r in timed[workers])})
    return row


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
