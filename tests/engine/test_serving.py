"""`frmap serve` for real: real PNGs over HTTP on 127.0.0.1, the results against the library's
own `Screener.screen`; the single-process service (uvicorn, in a thread of this process and as
the command) and the same application on Ray Serve; bounded request loops throughout."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from frmap.engine.data import DIGITS_IMAGES, decode_image, load_digits_split  # noqa: E402
from frmap.engine.models import load_digits_model  # noqa: E402
from frmap.engine.screening import Screener  # noqa: E402
from frmap.engine.serving import ScreeningApp, ServiceConfig  # noqa: E402
from frmap.engine.serving.access import (  # noqa: E402
    check_exposure,
    listening_sockets,
    read_token,
)
from frmap.engine.serving.core import Batcher, ClientError, Metrics  # noqa: E402
from frmap.engine.serving.local import local_server  # noqa: E402

TIMEOUT = 120.0
TOKEN = "s3cret-token-for-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def screener_file(tmp_path_factory, demo_detectors):
    model, detectors = demo_detectors
    screener = Screener(model, detectors).calibrate(
        load_digits_split("calibration").images[:100], 0.1)
    return screener.save(tmp_path_factory.mktemp("serve") / "screener.frmap")


@pytest.fixture(scope="module")
def pngs():
    test = load_digits_split("test")
    return [_png((test.images[i, 0].numpy() * 255).astype(np.uint8)) for i in range(16)]


@pytest.fixture(scope="module")
def expected(screener_file, pngs):
    """The library's own records of the PNGs, decoded as the service decodes them."""
    screener = Screener.load(screener_file, load_digits_model())
    images = np.stack([decode_image(b, DIGITS_IMAGES).numpy() for b in pngs])
    result = screener.screen(images)
    return [result.record(i) for i in range(len(pngs))]


def _assert_equal_records(got: dict, want: dict) -> None:
    assert got["prediction"] == want["prediction"] and got["flagged"] == want["flagged"]
    # the service's batches are not the library's: float32 passes over batches of another size
    # differ by rounding (squeezing's softmax distances by up to 2e-6 here)
    for name, score in want["scores"].items():
        assert got["scores"][name] == pytest.approx(score, rel=1e-5, abs=1e-5), name


def _wait_healthy(url: str, deadline: float, headers: dict | None = None) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy")


def _post(url: str, body: bytes, kind: str = "image/png", **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/screen", content=body,
                      headers={"Content-Type": kind, **headers}, timeout=TIMEOUT)


# --- the batcher alone: Triton's queue semantics -------------------------------------------


def _gated_batcher(max_batch: int, max_queued: int = 1000):
    """A batcher whose first pass blocks until `gate` is set; records each pass's size."""
    gate, sizes = threading.Event(), []

    def screen(images: torch.Tensor) -> list[dict]:
        if not sizes:
            gate.wait(10)
        sizes.append(len(images))
        return [{"value": float(x.sum())} for x in images]

    return Batcher(lambda image: image, screen, max_batch, 0.0, max_queued, Metrics()), gate, sizes


def test_an_idle_batcher_starts_at_once_and_batches_what_queued_meanwhile():
    batcher, gate, sizes = _gated_batcher(max_batch=4)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit([torch.full((1, 2, 2), 1.0)]))
        await asyncio.sleep(0.05)  # the first pass runs (blocked) with the only image there was
        later = [asyncio.ensure_future(batcher.submit([torch.full((1, 2, 2), float(k))]))
                 for k in range(2, 8)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert sizes == [1, 4, 2]  # 6 images queued during the first pass: passes of 4, then 2
    assert [r[:2] for r in first] == [({"value": 4.0}, 1)]
    assert first[0][2][1] >= 0.05  # the first pass's screening seconds: it waited for the gate
    assert [r[0][0]["value"] for r in later] == [4.0 * k for k in range(2, 8)]
    assert [r[0][1] for r in later] == [4, 4, 4, 4, 2, 2]


def test_an_image_that_does_not_decode_fails_alone_in_its_pass():
    """Images are decoded in the pass: one that fails gives its request the error, and the
    others of the pass their records."""
    def decode(item: float) -> torch.Tensor:
        if item < 0:
            raise ValueError(f"cannot decode {item}")
        return torch.full((1, 2, 2), item)

    sizes = []

    def screen(images: torch.Tensor) -> list[dict]:
        sizes.append(len(images))
        return [{"value": float(x.sum())} for x in images]

    batcher = Batcher(decode, screen, 8, 0.01, 100, Metrics())

    async def scenario():
        return await asyncio.gather(batcher.submit([1.0]), batcher.submit([-1.0]),
                                    batcher.submit([2.0, 3.0]), return_exceptions=True)

    good, bad, pair = asyncio.run(scenario())
    assert [r[:2] for r in good] == [({"value": 4.0}, 4)] and sizes == [3]
    assert isinstance(bad, ValueError) and "cannot decode -1.0" in str(bad)
    assert [r[0]["value"] for r in pair] == [8.0, 12.0]


def test_a_batcher_refuses_beyond_max_queued_and_survives_a_failed_pass():
    batcher, gate, _ = _gated_batcher(max_batch=2, max_queued=3)
    calls = []

    def failing(images: torch.Tensor) -> list[dict]:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("the pass broke")
        return [{} for _ in images]

    async def scenario():
        running = asyncio.ensure_future(batcher.submit([torch.zeros(1, 2, 2)]))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit([torch.zeros(1, 2, 2)] * 3))
        await asyncio.sleep(0.01)
        with pytest.raises(ClientError) as refused:
            await batcher.submit([torch.zeros(1, 2, 2)])
        gate.set()
        await running, await waiting
        batcher.screen = failing
        with pytest.raises(RuntimeError, match="the pass broke"):
            await batcher.submit([torch.zeros(1, 2, 2)])
        return refused.value, await batcher.submit([torch.zeros(1, 2, 2)])

    refused, after = asyncio.run(scenario())
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert [r[:2] for r in after] == [({}, 1)] and calls == [1, 1]


# --- the single-process service, in a thread of this process -------------------------------


@dataclass
class Served:
    url: str
    app: ScreeningApp


@contextmanager
def _serving(app: ScreeningApp) -> Iterator[Served]:
    """`app` behind uvicorn in a thread of this process, as `frmap serve` runs it by default."""
    threads = torch.get_num_threads()
    port = _free_port()
    server = local_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, time.monotonic() + TIMEOUT, AUTH)
        yield Served(url, app)
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        torch.set_num_threads(threads)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def local(screener_file):
    """The single-process service, with a token."""
    with _serving(ScreeningApp(screener_file.read_bytes(),
                               ServiceConfig(max_batch=8, max_bytes=20_000, cpus=1),
                               token=TOKEN)) as served:
        yield served


def test_a_compiled_service_screens_one_image_at_a_time_as_the_library(screener_file, pngs,
                                                                       expected):
    app = ScreeningApp(screener_file.read_bytes(),
                       ServiceConfig(max_batch=1, cpus=1, compile=True), token=TOKEN)
    runner = app.screener.runner
    compiled = runner.engines[runner.walker]._compiled
    assert app.screener.compile and len(compiled._graphs) == 1  # compiled while starting
    with _serving(app) as served:
        for body, want in zip(pngs[:3], expected[:3], strict=True):
            reply = _post(served.url, body, **AUTH)
            assert reply.status_code == 200, reply.text
            _assert_equal_records(reply.json(), want)
    assert len(compiled._graphs) == 1


def test_results_equal_the_library_and_requests_share_batches(local, pngs, expected):
    with ThreadPoolExecutor(len(pngs)) as pool:
        replies = list(pool.map(lambda b: _post(local.url, b, **AUTH), pngs))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for reply, want in zip(replies, expected, strict=True):
        _assert_equal_records(reply.json(), want)
    sizes = [int(s) for r in replies for s in r.headers["X-Batch-Sizes"].split(",")]
    assert max(sizes) > 1, f"no batching: batch sizes {sizes}"
    for reply in replies:  # the pass's own times, within what the client waited
        timing = dict(m.split(";dur=") for m in reply.headers["Server-Timing"].split(", "))
        assert set(timing) == {"decode", "screen"}, timing
        seconds = [float(v) / 1e3 for v in timing.values()]
        assert min(seconds) > 0 and sum(seconds) <= reply.elapsed.total_seconds()


def test_multipart_gives_one_result_per_part_in_order(local, pngs, expected):
    files = [(f"part{i}", (f"{i}.png", pngs[i], "image/png")) for i in (3, 1, 2)]
    reply = httpx.post(f"{local.url}/screen", files=files, headers=AUTH, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [r["name"] for r in body] == ["part3", "part1", "part2"]
    for record, i in zip(body, (3, 1, 2), strict=True):
        _assert_equal_records(record, expected[i])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
def test_without_the_token_every_route_answers_401(local, pngs, headers):
    for reply in (_post(local.url, pngs[0], **headers),
                  httpx.get(f"{local.url}/metrics", headers=headers, timeout=TIMEOUT),
                  httpx.get(f"{local.url}/healthz", headers=headers, timeout=TIMEOUT)):
        assert reply.status_code == 401, reply.text
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in reply.text


def _chunks(size: int):
    for _ in range(size // 1000):
        yield b"x" * 1000


@pytest.mark.parametrize(("body", "kind", "status", "message"), [
    (b"\x89PNG\r\n\x1a\n not really", "image/png", 400, "unreadable or corrupt"),
    (_png(np.zeros((28, 28), np.uint8)), "image/png", 400, "size 28x28"),
    (_png(np.zeros((32, 32, 3), np.uint8), "RGB"), "image/png", 400, "colour image"),
    (b"x" * 30_000, "image/png", 413, "limit is 20000"),
    (_chunks(30_000), "image/png", 413, "more than 20000 bytes"),  # no Content-Length
    (b"hello", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
])
def test_bad_input_is_the_clients_error_and_spares_the_others(local, pngs, body, kind, status,
                                                              message):
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(lambda a: _post(local.url, *a, **AUTH),
                             [(body, kind), (pngs[2], "image/png")])
    assert bad.status_code == status and message in bad.json()["error"], bad.text
    assert good.status_code == 200, good.text


def _slow(app: ScreeningApp, seconds: float):
    own = app.batcher.screen

    def screen(images):
        time.sleep(seconds)
        return own(images)

    return screen


def test_overload_answers_503_and_a_slow_request_504(local, pngs, monkeypatch):
    monkeypatch.setattr(local.app.batcher, "screen", _slow(local.app, 0.3))
    monkeypatch.setattr(local.app.batcher, "max_queued", 2)
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: _post(local.url, b, **AUTH), pngs[:12]))
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503}, statuses
    assert all(r.headers.get("Retry-After") for r in replies if r.status_code == 503)
    monkeypatch.setattr(local.app, "config", replace(local.app.config, timeout_s=0.1))
    late = _post(local.url, pngs[0], **AUTH)
    assert late.status_code == 504 and "within 0.1 s" in late.json()["error"], late.text


def test_a_failed_pass_fails_its_requests_and_the_service_goes_on(local, pngs, monkeypatch):
    own = local.app.batcher.screen
    calls = []

    def breaks_once(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("worker lost")
        return own(images)

    monkeypatch.setattr(local.app.batcher, "screen", breaks_once)
    failed = _post(local.url, pngs[0], **AUTH)
    assert failed.status_code == 500 and "worker lost" in failed.json()["error"]
    assert _post(local.url, pngs[1], **AUTH).status_code == 200


def test_metrics_name_the_whole_service_in_standard_units(local, pngs):
    assert _post(local.url, b"x" * 30_000, **AUTH).status_code == 413
    assert _post(local.url, pngs[0], **AUTH).status_code == 200
    text = httpx.get(f"{local.url}/metrics", headers=AUTH, timeout=TIMEOUT).text
    for line in ('frmap_requests_total{route="/screen",status="200"}',
                 "frmap_request_duration_seconds_bucket{le=", "frmap_batch_size_bucket{le=",
                 "frmap_queue_depth ", 'frmap_rejected_requests_total{reason="too_large"}'):
        assert line in text, line


# --- the command: one process, loopback only, refusals -------------------------------------


def _frmap(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "frmap.engine.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""}, **popen)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_frmap_serve_listens_on_loopback_only_and_stops_on_sigterm(screener_file, pngs,
                                                                    tmp_path):
    port = _free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = _frmap("serve", "--screener", str(screener_file), "--port", str(port),
                  "--cpus-per-replica", "1", "--max-batch", "4", "--token-file",
                  str(tmp_path / "token"))
    try:
        for line in proc.stdout:  # the service is up, its signal handlers in place
            if line.startswith("frmap serve:"):
                break
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, time.monotonic() + TIMEOUT, AUTH)
        assert httpx.get(f"{url}/healthz", headers=AUTH, timeout=30).json()["threads"] == 1
        assert _post(url, pngs[0]).status_code == 401
        reply = _post(url, pngs[0], **AUTH)
        assert reply.status_code == 200 and "flagged" in reply.json()
        sockets = listening_sockets(proc.pid)
        assert ("127.0.0.1", port) in sockets
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in sockets), sockets
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "frmap serve: stopped" in out and "Traceback" not in err
    assert TOKEN not in out + err


def test_frmap_serve_refuses_another_address_without_a_token(tmp_path):
    proc = _frmap("serve", "--screener", str(tmp_path / "never-read.frmap"), "--host", "0.0.0.0")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "--host 0.0.0.0" in err and "--token-file" in err and "--insecure" in err, err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "example.org"])
def test_only_loopback_goes_without_a_token(host, tmp_path):
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(loopback, None, False)
    with pytest.raises(ValueError, match="--token-file FILE .* or --insecure"):
        check_exposure(host, None, False)
    check_exposure(host, str(tmp_path / "token"), False)
    check_exposure(host, None, True)


@pytest.mark.parametrize(("text", "message"), [("", "holds no token"), ("a b", "without spaces"),
                                               ("caf\u00e9", "printable ASCII")])
def test_a_token_file_must_hold_one_token(tmp_path, text, message):
    (tmp_path / "token").write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        read_token(tmp_path / "token")
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert read_token(tmp_path / "token") == TOKEN


# --- the same application on Ray Serve -----------------------------------------------------


@pytest.fixture(scope="module")
def on_ray(screener_file):
    """One local Ray instance for the module (2 CPUs, no dashboard), the service at /."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from frmap.engine.serving.cluster import ray_application

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_application(screener_file.read_bytes(),
                                  ServiceConfig(max_batch=8, max_bytes=20_000), TOKEN),
                  name="main", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, time.monotonic() + TIMEOUT, AUTH)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_on_ray_results_equal_the_library_and_the_token_holds(on_ray, pngs, expected):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: _post(on_ray, b, **AUTH), pngs[:8]))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for reply, want in zip(replies, expected[:8], strict=True):
        _assert_equal_records(reply.json(), want)
    assert _post(on_ray, pngs[0]).status_code == 401


@pytest.mark.slow
def test_on_ray_a_killed_replica_fails_no_request_silently(on_ray, pngs):
    """Load from 6 clients for at most 20 s; the replica is killed after 2 s: every request
    gets its result or an error status (none hangs), and results come again within 30 s."""
    import ray

    outcomes: list[tuple[float, int | str]] = []
    start = time.monotonic()
    stop = start + 20.0
    recovered = threading.Event()
    killed_at: list[float] = []

    def client(k: int) -> None:
        i = k
        while time.monotonic() < stop and not recovered.is_set():
            try:
                status: int | str = httpx.post(
                    f"{on_ray}/screen", content=pngs[i % len(pngs)], timeout=40,
                    headers={"Content-Type": "image/png", **AUTH}).status_code
            except httpx.TimeoutException:
                status = "hung"
            except httpx.TransportError as err:
                status = type(err).__name__
            now = time.monotonic()
            outcomes.append((now, status))
            if killed_at and status == 200 and now > killed_at[0] + 0.5:
                recovered.set()
            i += 6

    with ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client, k) for k in range(6)]
        time.sleep(2.0)
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if "SERVE_REPLICA" in a["name"])
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]),
                 no_restart=False)
        killed_at.append(time.monotonic())
        for c in clients:
            c.result(timeout=60)
    statuses = [s for _, s in outcomes]
    assert "hung" not in statuses, statuses
    assert all(s == 200 or (isinstance(s, int) and s >= 500) for s in statuses), statuses
    assert recovered.is_set() or _post(on_ray, pngs[0], **AUTH).status_code == 200
    after = [t for t, s in outcomes if s == 200 and t > killed_at[0] + 0.5]
    assert after and after[0] - killed_at[0] < 30.0, statuses
