"""The screening service's one request path, served by uvicorn in one process or by Ray Serve
replicas on a cluster.

Routes:
- `POST /screen`: the raw bytes of one image as the body (`Content-Type: image/png` or
  `image/jpeg`) -> that image's screen result as one JSON object (the keys of a `frmap score`
  line, `path` aside); or `multipart/form-data` with one image per part -> a JSON list, one
  object per part in order, each with the part's `name`. The response header `X-Batch-Sizes`
  gives the size of the model batch each image went through, and `Server-Timing` the time of
  the longest of their passes, decoding its images and screening them
  (`decode;dur=MS, screen;dur=MS`).
- `GET /healthz`: 200 once the model is loaded, with the model's identity and torch's threads.
- `GET /metrics`: the Prometheus text format: `frmap_requests_total{route,status}` (route
  "other" for unknown paths), `frmap_request_duration_seconds` (histogram, `POST /screen`),
  `frmap_batch_size` (histogram, images per model pass), `frmap_queue_depth` (images waiting
  for a pass), `frmap_rejected_requests_total{reason}`; on Ray Serve, of the replica that
  answers.

Batching follows Triton's dynamic batcher: an image that reaches an idle service starts its
model pass at once; the images that arrive while a pass runs wait, and the next pass takes up to
`max_batch` of them together (waiting at most `max_wait_ms` more for a batch to fill; 0 by
default: never). Bad input is the client's error and never reaches the model (the pass decodes
its images first; one that fails, fails alone): 400 (not an image, wrong mode or size), 413 (a
body over `max_bytes`, refused while it is read), 415 (another content type). Beyond
`max_queued` images waiting the service answers 503 with `Retry-After`; a request not answered
within `timeout_s` (reading its body included) gets 504; with a token, every route answers 401
to a request without `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from frmap.engine.data.images import MAX_PIXELS, ImageFileError, decode_image
from frmap.engine.models.named import NamedModel
from frmap.engine.remote import ModelHost, check_positive, load_screener

T = TypeVar("T")
IMAGE_TYPES = ("image/png", "image/jpeg")
_ROUTES = ("/screen", "/healthz", "/metrics")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


@dataclass(frozen=True)
class ServiceConfig(ModelHost):
    """What the service serves and how, in each of its `ModelHost` processes.

    Attributes:
        max_batch: images per model pass at most.
        max_wait_ms: how long a pass that is not full waits for more images (0: it starts with
            the images already waiting).
        max_bytes: the largest request body accepted.
        max_pixels: image files of more pixels are refused from their header (400).
        max_queued: images waiting for a pass before 503.
        timeout_s: the longest a request may take, reading its body included, before 504.
        replicas: on Ray Serve, replicas of the service.
        compile: the entropy detectors' walks compiled (`Screener`'s `compile`): one image's
            graph while the service starts, any other batch size's on its first pass (seconds);
            then they screen faster (what pays for one image at a time: `max_batch` 1).
    """

    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_bytes: int = 10 << 20
    max_pixels: int = MAX_PIXELS
    max_queued: int = 256
    timeout_s: float = 30.0
    replicas: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "max_batch", "max_bytes", "max_pixels", "max_queued", "replicas")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms must lie in [0, 60000], got {self.max_wait_ms}")
        if not 0 < self.timeout_s <= 3600:
            raise ValueError(f"timeout_s must lie in (0, 3600], got {self.timeout_s}")


class ClientError(Exception):
    """A request the service refuses, with its HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("frmap_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.duration = Histogram("frmap_request_duration_seconds",
                                  "Time from a POST /screen request's arrival to its response",
                                  buckets=_SECONDS_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("frmap_batch_size", "Images per model pass",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("frmap_queue_depth", "Images waiting for a model pass",
                                 registry=self.registry)
        self.rejected = Counter("frmap_rejected_requests",
                                "Requests refused before screening, by reason",
                                ["reason"], registry=self.registry)


# Screens a batch [N, C, H, W]; returns one JSON-ready record per image.
ScreenBatch = Callable[[torch.Tensor], list[dict]]
# Decodes one queued item (a request's image file: name and bytes) to a [C, H, W] image.
Decode = Callable[[Any], torch.Tensor]


class Batcher:
    """Dynamic batching with Triton's queue semantics, in one asyncio loop.

    Requests queue their undecoded images. One pass runs at a time, always in the same worker
    thread, which decodes the images it takes and screens them, in one hand-over from the loop,
    and also loads the model (`run`): the loop keeps accepting requests, and the process keeps
    one team of OpenMP threads. A second team (another thread's torch ops) costs twice: its
    threads spin for milliseconds after each of its ops on the cores a pass needs (+12-20 ms on
    a VGG19 pass of 230 ms on 2 cores, after a resize on the loop), and with more OpenMP threads
    than cores every team's threads sleep between ops instead of spinning (+0.7 ms on a digits
    pass of 4 ms). A pass starts as soon as an image waits and none runs; it takes every image
    waiting, up to `max_batch`, and waits up to `max_wait_s` for more only while it is not
    full.
    """

    def __init__(self, decode: Decode, screen: ScreenBatch, max_batch: int, max_wait_s: float,
                 max_queued: int, metrics: Metrics) -> None:
        self.decode, self.screen = decode, screen
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.max_queued, self.metrics = max_queued, metrics
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="frmap-screen")

    async def submit(self, images: list[Any]) -> list[tuple[dict, int, tuple[float, float]]]:
        """Each image's record, the size of the pass it went through and that pass's seconds
        (decoding, screening), in order.

        Raises:
            ClientError: 503 where more than `max_queued` images would wait.
            Exception: what decoding one of them raised (ImageFileError), or the pass.
        """
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        if self._queue.qsize() + len(images) > self.max_queued:
            raise ClientError(503, f"overloaded: more than {self.max_queued} images wait",
                              {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self._queue.put_nowait((image, future))
        self.metrics.queue_depth.set(self._queue.qsize())
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for future in futures:  # a request given up on: its images leave the batches
                future.cancel()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in the thread that runs the passes, from outside the loop."""
        return self._thread.submit(fn, *args).result()

    def _pass(self, items: list[Any]) -> tuple[list[dict | Exception], tuple[float, float]]:
        """Each item's record, or the error that decoding it raised; the seconds the pass
        took to decode and to screen."""
        start = time.perf_counter()
        images, outcomes = [], []
        for item in items:
            try:
                images.append(self.decode(item))
                outcomes.append(None)
            except Exception as err:  # noqa: BLE001 - the item's own error, given back to it
                outcomes.append(err)
        decoded = time.perf_counter()
        records = iter(self.screen(torch.stack(images)) if images else ())
        return ([next(records) if outcome is None else outcome for outcome in outcomes],
                (decoded - start, time.perf_counter() - decoded))

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth.set(queue.qsize())
            live = [(image, future) for image, future in batch if not future.done()]
            if not live:
                continue
            self.metrics.batch_size.observe(len(live))
            try:
                outcomes, seconds = await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._pass, [item for item, _ in live])
            except Exception as err:  # the pass failed: its requests fail, the service goes on
                outcomes, seconds = [err] * len(live), (0.0, 0.0)
            for (_, future), outcome in zip(live, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result((outcome, len(live), seconds))


class ScreeningApp:
    """The service's request handling on a loaded screener: an ASGI application (uvicorn) and
    `handle` for a Ray Serve replica, the same code on both.

    Args:
        screener: the screener file's bytes.
        config: what to serve and how.
        token: the bearer token every request must carry (None: none asked).
        named: the classifier of `config`, where the caller has loaded it already (with one
            torch thread: see `Batcher`).

    The screener is loaded, and torch's threads set, in the batcher's worker thread.
    """

    def __init__(self, screener: bytes, config: ServiceConfig, token: str | None = None,
                 named: NamedModel | None = None) -> None:
        self.config = config
        self._token = None if token is None else f"Bearer {token}".encode()
        self.metrics = Metrics()
        self.batcher = Batcher(self._decode, self._screen, config.max_batch,
                               config.max_wait_ms / 1000, config.max_queued, self.metrics)
        named = self.batcher.run(self._load, screener, named)
        self.spec = replace(named.spec, max_pixels=config.max_pixels)

    def _load(self, screener: bytes, named: NamedModel | None) -> NamedModel:
        torch.set_num_threads(self.config.cpus)
        named = named or self.config.load()
        self.screener = load_screener(screener, named, self.config.max_batch,
                                      self.config.compile)
        if self.config.compile:  # one image's graph now, not in the first request's time
            spec = named.spec
            self.screener.scores(torch.zeros(1, spec.channels, *spec.size))
        return named

    def _screen(self, images: torch.Tensor) -> list[dict]:
        result = self.screener.screen(images)
        return [result.record(i) for i in range(len(result))]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        """The response to one HTTP request (every route)."""
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        route = path.rstrip("/") or "/"
        start = time.perf_counter()
        try:
            self._authorize(request)
            if route == "/screen" and request.method == "POST":
                response = await asyncio.wait_for(self._screen_request(request),
                                                  self.config.timeout_s)
            elif route == "/healthz" and request.method == "GET":
                response = JSONResponse({"status": "ok", "model": self.screener.identity,
                                         "threads": self.config.cpus})
            elif route == "/metrics" and request.method == "GET":
                response = Response(generate_latest(self.metrics.registry),
                                    media_type="text/plain; version=0.0.4")
            else:
                raise ClientError(404, f"no route {request.method} {route}; use POST /screen, "
                                       "GET /healthz or GET /metrics")
        except ClientError as err:
            response = self._refused(err)
        except asyncio.TimeoutError:
            response = self._refused(ClientError(
                504, f"not answered within {self.config.timeout_s:g} s"))
        except ImageFileError as err:
            response = self._refused(ClientError(400, str(err)))
        except Exception as err:  # a failed model pass: the request's error, not the service's
            response = JSONResponse({"error": f"screening failed: {type(err).__name__}: {err}"},
                                    status_code=500)
        if route == "/screen":
            self.metrics.duration.observe(time.perf_counter() - start)
        known = route if route in _ROUTES else "other"  # a label per path would grow unbounded
        self.metrics.requests.labels(known, str(response.status_code)).inc()
        return response

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._token):
            raise ClientError(401, "missing or wrong bearer token",
                              {"WWW-Authenticate": 'Bearer realm="frmap"'})

    def _refused(self, err: ClientError) -> Response:
        reason = {401: "unauthorized", 404: "not_found", 413: "too_large",
                  415: "unsupported_type", 503: "overloaded",
                  504: "timeout"}.get(err.status, "bad_request")
        self.metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    async def _screen_request(self, request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data" and kind not in IMAGE_TYPES:
            raise ClientError(415, f"unsupported Content-Type {kind or '(none)'!r}: send "
                                   f"{' or '.join(IMAGE_TYPES)} bytes, or multipart/form-data")
        body = await self._body(request)
        if kind == "multipart/form-data":
            parts = await self._parts(request, body)
            results = await self.batcher.submit(parts)
            content = [{"name": name, **record} for (name, _), (record, *_) in
                       zip(parts, results, strict=True)]
        else:
            results = await self.batcher.submit([("body", body)])
            content = results[0][0]
        sizes = ",".join(str(size) for _, size, _ in results)
        decode, screen = max((seconds for *_, seconds in results), key=sum)
        return Response(json.dumps(content), media_type="application/json",
                        headers={"X-Batch-Sizes": sizes, "Server-Timing":
                                 f"decode;dur={decode * 1e3:.3f}, screen;dur={screen * 1e3:.3f}"})

    def _decode(self, part: tuple[str, bytes]) -> torch.Tensor:
        name, data = part
        return decode_image(data, self.spec, name)

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes `max_bytes`."""
        limit = self.config.max_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ClientError(413, f"the body has {length} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ClientError(413, f"the body has more than {limit} bytes; the limit is "
                                       f"{limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parts(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_part_size=self.config.max_bytes)
        except Exception as err:  # starlette raises its own and python-multipart's errors
            raise ClientError(400, f"unreadable multipart body ({err})") from None
        parts = []
        for name, value in form.multi_items():
            if isinstance(value, str):
                raise ClientError(400, f"part {name!r} is a text field, not an image file")
            if value.content_type not in IMAGE_TYPES:
                raise ClientError(415, f"part {name!r} has Content-Type "
                                       f"{value.content_type!r}; send {' or '.join(IMAGE_TYPES)}")
            parts.append((name, await value.read()))
        if not parts:
            raise ClientError(400, "the multipart body holds no image")
        return parts
