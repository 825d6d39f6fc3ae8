"""`frmap bench serve`: the screening service under load, beside the library in the same run.

For the digits screener (entropy, kNN, squeezing) and an entropy screener on VGG19 at 224
(random weights): `Screener.screen`'s throughput at its best batch size; then the service on a
local Ray instance (one replica on every CPU), closed-loop load from 1, 4, 16 and 64 concurrent
clients on loopback for a bounded time (throughput, p50 / p95 / p99 latency), clients sending
several images per request (multipart), the same service with `--max-batch 1` at 16 clients, and
an open-loop load at half the saturating rate (latency from each request's scheduled time).
Beside them, Ray Serve's own ceiling on this machine: a deployment that does nothing, at 16
clients. The clients are coroutines of one asyncio loop in this process, on the same CPUs.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    per_request: int
    multipart_clients: tuple[int, ...]


FULL = (Case("digits", (1, 4, 16, 64), 8.0, (1, 8, 32, 64), 16, (2, 4)),
        Case("vgg19", (1, 4, 16, 64), 30.0, (1, 8, 16), 4, (2, 4)))
QUICK = (Case("digits", (1, 4), 2.0, (1, 8), 4, (2,)),)


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


class _Load:
    """Requests of `per_request` images each (one: a PNG body; more: multipart) to `url`."""

    def __init__(self, url: str, bodies: list[bytes], per_request: int = 1) -> None:
        self.url, self.bodies, self.per_request = url, bodies, per_request
        self.latencies: list[float] = []
        self.errors = 0

    async def send(self, http, i: int, since: float) -> None:
        n = len(self.bodies)
        if self.per_request == 1:
            reply = await http.post(self.url, content=self.bodies[i % n],
                                    headers={"Content-Type": "image/png"})
        else:
            reply = await http.post(self.url, files=[
                ("image", (f"{j}.png", self.bodies[(i * self.per_request + j) % n], "image/png"))
                for j in range(self.per_request)])
        if reply.status_code == 200:
            self.latencies.append(time.perf_counter() - since)
        else:
            self.errors += 1

    def summary(self, wall: float, **what: float) -> dict:
        q = np.percentile(self.latencies, [50, 95, 99]) if self.latencies else [np.nan] * 3
        return {**what, "per_request": self.per_request, "requests": len(self.latencies),
                "errors": self.errors,
                "images_per_s": len(self.latencies) * self.per_request / wall,
                "p50_ms": q[0] * 1e3, "p95_ms": q[1] * 1e3, "p99_ms": q[2] * 1e3}


def _client(connections: int):
    import httpx

    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=connections))


async def _closed(load: _Load, clients: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds

    async def client(http, k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            await load.send(http, i, time.perf_counter())
            i += clients

    async with _client(clients) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        return load.summary(time.monotonic() - start, clients=clients)


async def _open(load: _Load, rate: float, seconds: float) -> dict:
    async with _client(256) as http:
        start = time.perf_counter() + 0.5

        async def at(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            await load.send(http, i, scheduled)

        await asyncio.gather(*(at(i) for i in range(max(1, int(rate * seconds)))))
        return load.summary(time.perf_counter() - start, rate=rate)


def _closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float,
                 per_request: int = 1) -> dict:
    """`clients` clients, each sending its next request when the last one returns."""
    return asyncio.run(_closed(_Load(url, bodies, per_request), clients, seconds))


def _open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict:
    """Requests at a fixed rate; latency counts from each request's scheduled send time."""
    return asyncio.run(_open(_Load(url, bodies), rate, seconds))


CPUS = 2
PORT = 8765


@contextmanager
def _deployed(app, name: str) -> Iterator[str]:
    """`app` served at /<name> until the block ends; yields the URL of its POST /screen."""
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{PORT}/{name}/screen"
    finally:
        serve.delete(name)


def _service(screener_bytes: bytes, case: Case, max_batch: int):
    from frmap.engine.serving import ServiceConfig, service

    return service(screener_bytes, ServiceConfig(model=case.model, max_batch=max_batch,
                                                 max_wait_ms=10.0, max_queued=1024, cpus=CPUS))


def _nothing():
    """A deployment that answers every request with a fixed JSON object at once."""
    from ray import serve

    @serve.deployment(name="nothing", max_ongoing_requests=128,
                      ray_actor_options={"num_cpus": CPUS})
    class Nothing:
        async def __call__(self, request) -> dict:
            await request.body()
            return {"flagged": False}

    return Nothing.bind()


def _case(case: Case, tmp: Path) -> dict:
    screener, bodies, images = _screener(case.model)
    library = _library(screener, images, case.library_batches)
    data = screener.save(tmp / f"{case.model}.frmap").read_bytes()
    with _deployed(_service(data, case, 1), f"{case.model}-single") as single:
        _closed_loop(single, bodies, 2, min(case.seconds, 5.0))  # warm-up
        unbatched = _closed_loop(single, bodies, 16, case.seconds)
    with _deployed(_service(data, case, 32), f"{case.model}-batched") as batched:
        _closed_loop(batched, bodies, 2, min(case.seconds, 5.0))
        closed = [_closed_loop(batched, bodies, c, case.seconds) for c in case.clients]
        multipart = [_closed_loop(batched, bodies, c, case.seconds, case.per_request)
                     for c in case.multipart_clients]
        saturation = max(r["images_per_s"] for r in closed)
        half = _open_loop(batched, bodies, saturation / 2, case.seconds)
    return {"model": case.model, "library_images_per_s": library, "closed_loop": closed,
            "multipart": multipart, "max_batch_1": unbatched, "half_load": half,
            "saturation_images_per_s": saturation}


def run(quick: bool = False) -> dict:
    """Measure every case; return the rows, Ray Serve's ceiling, the targets and the machine."""
    try:
        import httpx  # noqa: F401
        import ray
        from ray import serve
    except ImportError as err:
        raise RuntimeError(f"frmap bench serve needs Ray Serve and httpx ({err}): pip install "
                           "'frmap[serve,test]'") from None
    cases = QUICK if quick else FULL
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        with _deployed(_nothing(), "nothing") as url:
            _closed_loop(url, [b"x" * 300], 2, 2.0)  # warm-up
            ceiling = _closed_loop(url, [b"x" * 300], 16, cases[0].seconds)
        with tempfile.TemporaryDirectory() as tmp:
            rows = [_case(case, Path(tmp)) for case in cases]
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"rows": rows, "ray_serve_ceiling": ceiling, "targets": _targets(rows),
            "machine": machine.describe()}


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        library = max(r["library_images_per_s"].values())
        sixteen = next((c for c in r["closed_loop"] if c["clients"] == 16), None)
        multipart = max((c["images_per_s"] for c in r["multipart"]), default=float("nan"))
        half = r["half_load"]
        out += [
            _target(r, "service / library at saturation, 1 image per request",
                    r["saturation_images_per_s"] / library, ">=", 0.85),
            _target(r, f"service / library, {r['multipart'][0]['per_request']} images per "
                       "request" if r["multipart"] else "service / library, multipart",
                    multipart / library, ">=", 0.85),
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
    ceiling = result["ray_serve_ceiling"]
    lines = [machine.summary(result["machine"]),
             f"Ray Serve alone (a deployment that does nothing, 16 clients): "
             f"{ceiling['images_per_s']:.1f} requests/s, p50 {ceiling['p50_ms']:.1f} ms"]
    for r in result["rows"]:
        library = ", ".join(f"batch {b}: {v:.1f}" for b, v in r["library_images_per_s"].items())
        lines += [f"\n{r['model']}: Screener.screen images/s ({library})",
                  f"{'load':>30} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
        for c in r["closed_loop"]:
            lines.append(_line(f"{c['clients']} clients", c))
        for c in r["multipart"]:
            lines.append(_line(f"{c['clients']} clients x {c['per_request']} images", c))
        lines.append(_line("16 clients, max-batch 1", r["max_batch_1"]))
        lines.append(_line(f"open loop {r['half_load']['rate']:.1f}/s", r["half_load"]))
    lines.append("")
    for t in result["targets"]:
        lines.append(f"{t['model']:7} {t['target']:55} {t['value']:7.2f} {t['goal']:>6} "
                     f"{'ok' if t['ok'] else 'MISSED'}")
    return "\n".join(lines)


def _line(label: str, r: dict) -> str:
    return (f"{label:>30} {r['images_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
            f"{r['p99_ms']:8.1f}" + (f"  ({r['errors']} errors)" if r["errors"] else ""))
