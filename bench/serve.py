"""`frmap bench serve`: the screening service under load, beside the library in the same run.

For the digits screener (entropy, kNN, squeezing) and an entropy screener on VGG19 at 224
(random weights): `Screener.screen`'s throughput at its best batch size; then the service on a
local Ray instance, closed-loop load from 1, 4, 16 and 64 concurrent clients on loopback for a
bounded time (throughput, p50 / p95 / p99 latency), the same with `--max-batch 1` at 16 clients,
and an open-loop load at half the saturating rate (latency from each request's scheduled time).
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import frmap.bench.machine as machine
from frmap.engine.data import load_digits_split
from frmap.engine.detectors import EntropyDetector
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.models import model_identity
from frmap.engine.models.named import load_model
from frmap.engine.screening import Screener
from frmap.engine.screening.build import clean_detectors


@dataclass(frozen=True)
class Case:
    model: str
    clients: tuple[int, ...]
    seconds: float
    library_batches: tuple[int, ...]


FULL = (Case("digits", (1, 4, 16, 64), 8.0, (1, 8, 32, 64)),
        Case("vgg19", (1, 4, 16, 64), 30.0, (1, 8, 16)))
QUICK = (Case("digits", (1, 4), 2.0, (1, 8)),)


def _screener(name: str) -> tuple[Screener, list[bytes], torch.Tensor]:
    """A calibrated screener, PNG request bodies and the same images decoded."""
    named = load_model(name)
    if name == "digits":
        train, cal, test = (load_digits_split(s) for s in ("train", "calibration", "test"))
        detectors = clean_detectors(("entropy", "knn", "squeeze"), named.model, named.classifier,
                                    train=(train.images, train.labels), footprint="square3",
                                    rule="guided", target="conv_max", squeeze=DIGITS_SQUEEZERS)
        clean, images = cal.images, test.images[:64]
    else:
        g = torch.Generator().manual_seed(0)
        clean, images = torch.rand(16, 3, 224, 224, generator=g), torch.rand(16, 3, 224, 224,
                                                                           generator=g)
        detectors = {"entropy": EntropyDetector("square3", "guided", "conv_max",
                                                model_identity(named.model))}
    screener = Screener(named.model, detectors, preprocess=named.preprocess)
    screener = screener.calibrate(clean, 0.05)
    mode = "L" if images.shape[1] == 1 else "RGB"
    bodies = []
    for image in images:
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    return screener, bodies, images


def _library(screener: Screener, images: torch.Tensor, batches: tuple[int, ...]) -> dict:
    """Images/s of `Screener.screen` at each batch size (best of two runs each)."""
    rates = {}
    for batch in batches:
        x = images[:batch].repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
        screener.batch_size = batch
        screener.screen(x)  # warm-up
        best = min(_timed(lambda x=x: screener.screen(x)) for _ in range(2))
        rates[batch] = batch / best
    return rates


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads, each sending its next request when the last one returns."""
    import httpx

    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            i = k
            while time.monotonic() < deadline:
                start = time.perf_counter()
                reply = http.post(url, content=bodies[i % len(bodies)],
                                  headers={"Content-Type": "image/png"})
                took = time.perf_counter() - start
                with lock:
                    if reply.status_code == 200:
                        latencies.append(took)
                    else:
                        errors[0] += 1
                i += clients

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return _summary(latencies, errors[0], time.monotonic() - start, clients=clients)


def _open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict:
    """Requests at a fixed rate; latency counts from each request's scheduled send time."""
    import httpx

    count = max(1, int(rate * seconds))
    start = time.monotonic() + 0.5
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    local = threading.local()

    def send(i: int) -> None:
        scheduled = start + i / rate
        time.sleep(max(0.0, scheduled - time.monotonic()))
        http = getattr(local, "http", None) or httpx.Client(timeout=600)
        local.http = http
        reply = http.post(url, content=bodies[i % len(bodies)],
                          headers={"Content-Type": "image/png"})
        with lock:
            if reply.status_code == 200:
                latencies.append(time.monotonic() - scheduled)
            else:
                errors[0] += 1

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(send, range(count)))
    return _summary(latencies, errors[0], time.monotonic() - start, rate=rate)


def _summary(latencies: list[float], errors: int, wall: float, **what: float) -> dict:
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {**what, "requests": len(latencies), "errors": errors,
            "images_per_s": len(latencies) / wall, "p50_ms": q[0] * 1e3, "p95_ms": q[1] * 1e3,
            "p99_ms": q[2] * 1e3}


def _service(screener: Screener, case: Case, max_batch: int, tmp: Path, port: int,
             name: str) -> str:
    from ray import serve

    from frmap.engine.serving import ServiceConfig, service

    path = screener.save(tmp / f"{case.model}.frmap")
    config = ServiceConfig(model=case.model, max_batch=max_batch, max_wait_ms=10.0,
                           max_queued=1024)
    serve.run(service(path.read_bytes(), config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}/screen"


def run(quick: bool = False) -> dict:
    """Measure every case; return the rows, the targets and the machine."""
    try:
        import httpx  # noqa: F401
        import ray
        from ray import serve
    except ImportError as err:
        raise RuntimeError(f"frmap bench serve needs Ray Serve and httpx ({err}): pip install "
                           "'frmap[serve,test]'") from None
    rows = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = 8765
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            for case in QUICK if quick else FULL:
                screener, bodies, images = _screener(case.model)
                library = _library(screener, images, case.library_batches)
                batched = _service(screener, case, 32, Path(tmp), port, f"{case.model}-batched")
                single = _service(screener, case, 1, Path(tmp), port, f"{case.model}-single")
                _closed_loop(batched, bodies, 2, min(case.seconds, 5.0))  # warm-up
                closed = [_closed_loop(batched, bodies, c, case.seconds) for c in case.clients]
                unbatched = _closed_loop(single, bodies, min(16, max(case.clients)),
                                         case.seconds)
                saturation = max(r["images_per_s"] for r in closed)
                half = _open_loop(batched, bodies, saturation / 2, case.seconds)
                rows.append({"model": case.model, "library_images_per_s": library,
                             "closed_loop": closed, "max_batch_1": unbatched,
                             "half_load": half, "saturation_images_per_s": saturation})
                for app in (f"{case.model}-batched", f"{case.model}-single"):
                    serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"rows": rows, "targets": _targets(rows), "machine": machine.describe()}


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        library = max(r["library_images_per_s"].values())
        sixteen = next((c for c in r["closed_loop"] if c["clients"] == 16), None)
        half = r["half_load"]
        out += [
            _target(r, "service / library throughput at saturation",
                    r["saturation_images_per_s"] / library, ">=", 0.85),
            _target(r, "batching / max-batch 1 at 16 clients",
                    sixteen["images_per_s"] / r["max_batch_1"]["images_per_s"] if sixteen
                    else float("nan"), ">=", 2.0),
            _target(r, "p99 / p50 at half the saturating load",
                    half["p99_ms"] / half["p50_ms"], "<=", 3.0),
        ]
    return out


def _target(row: dict, what: str, value: float, op: str, goal: float) -> dict:
    ok = value >= goal if op == ">=" else value <= goal
    return {"model": row["model"], "target": what, "value": value, "goal": f"{op} {goal:g}",
            "ok": bool(np.isfinite(value) and ok)}


def table(result: dict) -> str:
    """A terminal table of the rows and targets."""
    lines = [machine.summary(result["machine"])]
    for r in result["rows"]:
        library = ", ".join(f"batch {b}: {v:.1f}" for b, v in r["library_images_per_s"].items())
        lines += [f"\n{r['model']}: Screener.screen images/s ({library})",
                  f"{'load':>22} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
        for c in r["closed_loop"]:
            lines.append(_line(f"{c['clients']} clients", c))
        lines.append(_line("16 clients, max-batch 1", r["max_batch_1"]))
        lines.append(_line(f"open loop {r['half_load']['rate']:.1f}/s", r["half_load"]))
    lines.append("")
    for t in result["targets"]:
        lines.append(f"{t['model']:7} {t['target']:45} {t['value']:7.2f} {t['goal']:>6} "
                     f"{'ok' if t['ok'] else 'MISSED'}")
    return "\n".join(lines)


def _line(label: str, r: dict) -> str:
    return (f"{label:>22} {r['images_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
            f"{r['p99_ms']:8.1f}" + (f"  ({r['errors']} errors)" if r["errors"] else ""))

