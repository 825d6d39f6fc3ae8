"""`frmap serve`: a screener behind HTTP on Ray Serve, with dynamic batching.

Routes:
- `POST /screen`: the raw bytes of one image as the body (`Content-Type: image/png` or
  `image/jpeg`) -> that image's screen result as one JSON object (the keys of a `frmap score`
  line, `path` aside); or `multipart/form-data` with one image per part -> a JSON list, one
  object per part in order, each with the part's `name`. The response header `X-Batch-Sizes`
  gives the size of the model batch each image went through.
- `GET /healthz`: 200 once the model is loaded, with the model's identity and the replica's
  torch threads.
- `GET /metrics`: request counts by status, batch sizes and latencies, in the Prometheus text
  format (per replica).

Concurrent requests share one model pass (`serve.batch`: up to `max_batch` images, waiting at most
`max_wait_ms` for a batch to fill). Bad input is the client's error and never reaches a batch:
400 (not an image, wrong mode or size), 413 (over `max_bytes`), 415 (another content type).
Beyond `max_queued` waiting requests a replica answers 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from frmap.engine.data.images import ImageFileError, decode_image
from frmap.engine.models.named import load_model
from frmap.engine.serving.jobs import check_positive, load_screener

IMAGE_TYPES = ("image/png", "image/jpeg")


@dataclass(frozen=True)
class ServiceConfig:
    """What a replica serves and how.

    Attributes:
        model, weights, seed: the classifier (`frmap.engine.models.named.load_model`); a
            weights file must be readable on every node of the cluster.
        device: "cpu", "cuda" or "cuda:N" (on the replica's node).
        max_batch, max_wait_ms: dynamic batching.
        max_bytes: the largest request body accepted.
        max_queued: requests waiting per replica before 503.
        replicas, cpus, gpus: replicas of the service, and CPUs and GPUs per replica (a
            replica reserves `cpus` CPUs in Ray and runs torch on as many threads).
    """

    model: str = "digits"
    weights: str | None = None
    seed: int = 0
    device: str = "cpu"
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_bytes: int = 10 << 20
    max_queued: int = 256
    replicas: int = 1
    cpus: int = 1
    gpus: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "max_batch", "max_bytes", "max_queued", "replicas", "cpus")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms must lie in [0, 60000], got {self.max_wait_ms}")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@serve.deployment(name="frmap-screener")
class ScreeningService:
    """One replica: the model and screener loaded once, requests screened in shared batches."""

    def __init__(self, screener: bytes, config: ServiceConfig) -> None:
        self.config = config
        torch.set_num_threads(config.cpus)
        named = load_model(config.model, config.weights, seed=config.seed, device=config.device)
        self.screener = load_screener(screener, named, config.max_batch)
        self.spec = named.spec
        self.screen_batch.set_max_batch_size(config.max_batch)
        self.screen_batch.set_batch_wait_timeout_s(config.max_wait_ms / 1000)
        self.registry = CollectorRegistry()
        self.requests = Counter("frmap_requests", "Requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.batch_sizes = Histogram("frmap_batch_size", "Images per model pass",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                     registry=self.registry)
        self.latency = Histogram("frmap_request_seconds", "Latency of POST /screen",
                                 registry=self.registry)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        route = path.rstrip("/") or "/"
        if route == "/healthz" and request.method == "GET":
            return self._respond(route, JSONResponse({"status": "ok",
                                                      "model": self.screener.identity,
                                                      "threads": torch.get_num_threads()}))
        if route == "/metrics" and request.method == "GET":
            return Response(generate_latest(self.registry),
                            media_type="text/plain; version=0.0.4")
        if route != "/screen" or request.method != "POST":
            return self._respond(route, JSONResponse(
                {"error": f"no route {request.method} {route}; use POST /screen, GET /healthz "
                          "or GET /metrics"}, status_code=404))
        start = time.perf_counter()
        try:
            response = await self._screen(request)
        except _ClientError as err:
            response = JSONResponse({"error": str(err)}, status_code=err.status)
        self.latency.observe(time.perf_counter() - start)
        return self._respond(route, response)

    def _respond(self, route: str, response: Response) -> Response:
        self.requests.labels(route, str(response.status_code)).inc()
        return response

    async def _screen(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_bytes:
            raise _ClientError(413, f"the body has {length} bytes; the limit is "
                                    f"{self.config.max_bytes}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            parts = await self._parts(request)
            images = [self._decode(data, name) for name, data in parts]
            results = await asyncio.gather(*(self.screen_batch(image) for image in images))
            body = [{"name": name, **record} for (name, _), (record, _) in
                    zip(parts, results, strict=True)]
            sizes = [size for _, size in results]
        elif kind in IMAGE_TYPES:
            data = await request.body()
            if len(data) > self.config.max_bytes:
                raise _ClientError(413, f"the body has {len(data)} bytes; the limit is "
                                        f"{self.config.max_bytes}")
            body, size = await self.screen_batch(self._decode(data, "body"))
            sizes = [size]
        else:
            raise _ClientError(415, f"unsupported Content-Type {kind or '(none)'!r}: send "
                                    f"{' or '.join(IMAGE_TYPES)} bytes, or multipart/form-data")
        return JSONResponse(body, headers={"X-Batch-Sizes": ",".join(map(str, sizes))})

    async def _parts(self, request: Request) -> list[tuple[str, bytes]]:
        try:
            form = await request.form(max_part_size=self.config.max_bytes)
        except Exception as err:  # starlette raises its own and python-multipart's errors
            raise _ClientError(400, f"unreadable multipart body ({err})") from None
        parts = []
        for name, value in form.multi_items():
            if isinstance(value, str):
                raise _ClientError(400, f"part {name!r} is a text field, not an image file")
            if value.content_type not in IMAGE_TYPES:
                raise _ClientError(415, f"part {name!r} has Content-Type "
                                        f"{value.content_type!r}; send {' or '.join(IMAGE_TYPES)}")
            parts.append((name, await value.read()))
        if not parts:
            raise _ClientError(400, "the multipart body holds no image")
        total = sum(len(data) for _, data in parts)
        if total > self.config.max_bytes:
            raise _ClientError(413, f"the parts hold {total} bytes; the limit is "
                                    f"{self.config.max_bytes}")
        return parts

    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        try:
            return decode_image(data, self.spec, name)
        except ImageFileError as err:
            raise _ClientError(400, str(err)) from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def screen_batch(self, images: list[torch.Tensor]) -> list[tuple[dict, int]]:
        """One model pass over the images of concurrent requests."""
        self.batch_sizes.observe(len(images))
        result = await asyncio.to_thread(self.screener.screen, torch.stack(images))
        return [(result.record(i), len(images)) for i in range(len(images))]


def service(screener: bytes, config: ServiceConfig) -> serve.Application:
    """The Ray Serve application of a screener file's bytes (see `ScreeningService`)."""
    options = {"num_replicas": config.replicas, "max_queued_requests": config.max_queued,
               "max_ongoing_requests": max(2 * config.max_batch, 8),
               "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
               "ray_actor_options": {"num_cpus": config.cpus, "num_gpus": config.gpus}}
    return ScreeningService.options(**options).bind(screener, config)

