"""`frmap serve` for real: Ray Serve on 127.0.0.1, real PNGs over HTTP, bounded request loops."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from frmap.engine.data import DIGITS_IMAGES, decode_image, load_digits_split  # noqa: E402
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS  # noqa: E402
from frmap.engine.models import load_digits_model  # noqa: E402
from frmap.engine.screening import Screener  # noqa: E402
from frmap.engine.screening.build import clean_detectors  # noqa: E402
from frmap.engine.serving import ServiceConfig, service  # noqa: E402

TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def screener_file(tmp_path_factory):
    model = load_digits_model()
    train, cal = load_digits_split("train"), load_digits_split("calibration")
    detectors = clean_detectors(("entropy", "knn", "squeeze"), model, model,
                                train=(train.images[:300], train.labels[:300]),
                                footprint="square3", rule="guided", target="conv_max",
                                squeeze=DIGITS_SQUEEZERS)
    screener = Screener(model, detectors).calibrate(cal.images[:100], 0.1)
    return screener.save(tmp_path_factory.mktemp("serve") / "screener.frmap")


@pytest.fixture(scope="module")
def pngs():
    test = load_digits_split("test")
    return [_png((test.images[i, 0].numpy() * 255).astype(np.uint8)) for i in range(16)]


def _wait_healthy(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy")


def test_frmap_serve_starts_answers_and_stops_on_sigterm(screener_file, pngs):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "frmap.engine.cli", "serve", "--screener", str(screener_file),
         "--port", str(port), "--num-cpus", "2", "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_ADDRESS": ""})
    try:
        for line in proc.stdout:  # the service is up, its signal handlers in place
            if line.startswith("frmap serve:"):
                break
        _wait_healthy(f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT)
        # one replica on the local instance: it reserves both CPUs and runs torch on both
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["threads"] == 2
        reply = httpx.post(f"http://127.0.0.1:{port}/screen", content=pngs[0],
                           headers={"Content-Type": "image/png"}, timeout=30)
        assert reply.status_code == 200 and "flagged" in reply.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "frmap serve: stopped" in out and "Traceback" not in err


@pytest.fixture(scope="module")
def url(screener_file):
    """One local Ray instance for the module: the service at / and a tight one at /tight."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        data = screener_file.read_bytes()
        serve.run(service(data, ServiceConfig(max_batch=8, max_wait_ms=200, max_bytes=20_000)),
                  name="main", route_prefix="/")
        serve.run(service(data, ServiceConfig(max_batch=1, max_wait_ms=0, max_queued=1)),
                  name="tight", route_prefix="/tight")
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, time.monotonic() + TIMEOUT)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: bytes, kind: str = "image/png") -> httpx.Response:
    return httpx.post(f"{url}/screen", content=body, headers={"Content-Type": kind},
                      timeout=TIMEOUT)


def test_results_equal_the_library_and_requests_share_batches(url, screener_file, pngs):
    with ThreadPoolExecutor(len(pngs)) as pool:
        replies = list(pool.map(lambda b: _post(url, b), pngs))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    screener = Screener.load(screener_file, load_digits_model())
    images = np.stack([decode_image(b, DIGITS_IMAGES).numpy() for b in pngs])
    expected = screener.screen(images)
    for i, reply in enumerate(replies):
        got, want = reply.json(), expected.record(i)
        assert got["prediction"] == want["prediction"] and got["flagged"] == want["flagged"]
        # the service's batches are not the library's: float32 passes over batches of another
        # size differ by rounding (squeezing's softmax distances by up to 2e-6 here)
        for name, score in want["scores"].items():
            assert got["scores"][name] == pytest.approx(score, rel=1e-5, abs=1e-5)
    sizes = [int(s) for r in replies for s in r.headers["X-Batch-Sizes"].split(",")]
    assert max(sizes) > 1, f"no batching: batch sizes {sizes}"
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert "frmap_batch_size_count" in metrics and 'status="200"' in metrics


def test_multipart_gives_one_result_per_part(url, pngs):
    files = [("first", ("a.png", pngs[0], "image/png")), ("second", ("b.png", pngs[1],
                                                                     "image/png"))]
    reply = httpx.post(f"{url}/screen", files=files, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert [r["name"] for r in reply.json()] == ["first", "second"]


@pytest.mark.parametrize(("body", "kind", "status", "message"), [
    (b"\x89PNG\r\n\x1a\n not really", "image/png", 400, "unreadable or corrupt"),
    (_png(np.zeros((28, 28), np.uint8)), "image/png", 400, "size 28x28"),
    (_png(np.zeros((32, 32, 3), np.uint8), "RGB"), "image/png", 400, "colour image"),
    (b"x" * 30_000, "image/png", 413, "limit is 20000"),
    (b"hello", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
])
def test_bad_input_is_the_clients_error_and_spares_the_others(url, pngs, body, kind, status,
                                                              message):
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(lambda a: _post(url, *a), [(body, kind), (pngs[2], "image/png")])
    assert bad.status_code == status and message in bad.json()["error"], bad.text
    assert good.status_code == 200, good.text


def test_overload_answers_503_with_retry_after(url, pngs):
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda b: _post(f"{url}/tight", b), pngs * 3))
    statuses = {r.status_code for r in replies}
    assert statuses <= {200, 503} and 503 in statuses, statuses
    assert all(r.headers.get("Retry-After") for r in replies if r.status_code == 503)
