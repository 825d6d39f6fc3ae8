"""`frmap bench serve`: the screening service under load, per ingress mode, beside the library.

For the digits screener (entropy, kNN, squeezing) and an entropy screener on VGG19 at 224
(random weights): the library's `Screener.screen` throughput at each batch size, on as many torch
threads as the service gets; then `frmap serve` itself, started as a command in each ingress
mode with the library's best batch size as its `--max-batch`:

- `uvicorn`: the default on one machine, one process, no Ray;
- `ray-proxy`: Ray Serve on a local instance (`--ray`), its Python proxy in front;
- `ray-direct`: the same with `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`: the replica serves HTTP on a
  port of its own (30000-30999), which the clients call directly (the proxy stays, unused);
- `ray-haproxy`: the same with `RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy in front, direct ingress);
- `ray-throughput`: the same with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (direct ingress, called
  directly as above, gRPC between deployments, user code in the replica's main loop).

Against each: latency at 1 client (p50, p99), closed loop, taking turns of about a second with
the library's calls at batch 1 (so that both latencies see the same machine; 50 ms apart, so
that neither runs while the other's threads still spin), and what the service adds to its own
screen of the same request (the latency less the screen time its `Server-Timing` header gives:
decoding, HTTP and the hand-overs; two processes running the same screen differ by several
percent, more than the 3 ms the service may add to a VGG19 screen), throughput at saturation
with one image per request and with 16-image multipart requests (closed loop, the best of
several client counts), and the p99 / p50 ratio of an open loop at half the saturating rate
(latency from each request's scheduled time). The TCP sockets the mode's process tree listens on
are listed, and those on other interfaces than loopback counted. The clients are coroutines of
one asyncio loop in this process speaking plain HTTP/1.1 over keep-alive connections (a client
far cheaper than an HTTP library, so that the load takes little of the CPUs the service shares).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
from frmap.engine.models.runtime import torch_settings
from frmap.engine.screening import Screener
from frmap.engine.screening.build import clean_detectors
from frmap.engine.serving.access import listening_sockets

# mode -> (extra `frmap serve` arguments, extra environment)
MODES = {
    "uvicorn": ((), {}),
    "ray-proxy": (("--ray",), {}),
    "ray-direct": (("--ray",), {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}),
    "ray-haproxy": (("--ray",), {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
    "ray-throughput": (("--ray",), {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
}
PER_REQUEST = 16  # images per multipart request
# the 1-client latency: the library and the service take turns of about TURN_S each, TURN_GAP_S
# apart (OpenMP threads spin for milliseconds after a parallel region, on the cores the other's
# call needs)
TURN_S, TURN_GAP_S = 1.0, 0.05
DIRECT = ("ray-direct", "ray-throughput")  # modes whose clients call the replica's own port
DIRECT_PORTS = range(30000, 31000)  # Ray Serve's default for direct-ingress HTTP ports


@dataclass(frozen=True)
class Case:
    model: str
    modes: tuple[str, ...]
    seconds: float
    clients: tuple[int, ...]  # closed-loop client counts tried for the saturation
    library_batches: tuple[int, ...]


FULL = (Case("digits", tuple(MODES), 6.0, (16, 64, 128), (1, 8, 32, 64, 128)),
        Case("vgg19", tuple(MODES), 20.0, (4, 16), (1, 4, 16)))
QUICK = (Case("digits", ("uvicorn", "ray-proxy"), 2.0, (32,), (1, 32)),)
CPUS = len(os.sched_getaffinity(0))


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
        clean = torch.rand(16, 3, 224, 224, generator=g)
        images = torch.rand(16, 3, 224, 224, generator=g)
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
    """Images/s at each batch size (the best of two calls each), and the best batch size."""
    rates = {}
    with torch_settings(CPUS):
        for batch in batches:
            x = images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
            screener.batch_size = batch
            screener.screen(x)
            rates[batch] = batch / min(_timed(lambda x=x: screener.screen(x)) for _ in range(2))
    best = max(rates, key=rates.get)
    return {"images_per_s": rates, "best_batch": best, "best_images_per_s": rates[best]}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _request(port: int, bodies: list[bytes]) -> bytes:
    """One HTTP/1.1 POST /screen of `bodies` (one: a PNG body; more: multipart)."""
    if len(bodies) == 1:
        kind, body = "image/png", bodies[0]
    else:
        boundary = "frmapbenchboundary"
        kind = f"multipart/form-data; boundary={boundary}"
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"i{k}\"; "
                        f"filename=\"{k}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
                        + data + b"\r\n" for k, data in enumerate(bodies))
        body += f"--{boundary}--\r\n".encode()
    head = (f"POST /screen HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Load:
    """Prebuilt requests, sent over keep-alive connections; latencies of the 200s."""

    def __init__(self, port: int, bodies: list[bytes], per_request: int) -> None:
        n = len(bodies)
        self.port, self.per_request = port, per_request
        self.requests = [_request(port, [bodies[(i * per_request + j) % n]
                                         for j in range(per_request)]) for i in range(n)]
        self.latencies: list[float] = []
        self.added: list[float] = []  # each 200's latency less the service's own screen time
        self.errors = 0

    async def connect(self):
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def send(self, stream, i: int, since: float):
        """Send request `i` on `stream`; the stream to go on with (a new one after a broken
        connection, which counts as an error)."""
        try:
            await self._exchange(stream, i, since)
            return stream
        except (OSError, EOFError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.errors += 1
            stream[1].close()
            return await self.connect()

    async def _exchange(self, stream, i: int, since: float) -> None:
        reader, writer = stream
        writer.write(self.requests[i % len(self.requests)])
        status = int((await reader.readline()).split()[1])
        length, chunked, screen = 0, False, None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"server-timing":
                screen = float(value.split(b"screen;dur=")[1].split(b",")[0]) / 1e3
            chunked |= name == b"transfer-encoding" and b"chunked" in value.lower()
        if chunked:
            while (size := int((await reader.readline()).strip(), 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
        else:
            await reader.readexactly(length)
        if status == 200:
            self.latencies.append(time.perf_counter() - since)
            if screen is not None:
                self.added.append(self.latencies[-1] - screen)
        else:
            self.errors += 1

    def summary(self, wall: float, **what: float) -> dict:
        q = np.percentile(self.latencies, [50, 99]) if self.latencies else [np.nan] * 2
        return {**what, "per_request": self.per_request, "requests": len(self.latencies),
                "errors": self.errors,
                "images_per_s": len(self.latencies) * self.per_request / wall,
                "p50_ms": q[0] * 1e3, "p99_ms": q[1] * 1e3,
                "added_p50_ms": float(np.median(self.added)) * 1e3 if self.added else None}


async def _paired(load: _Load, screener: Screener, images: torch.Tensor,
                  seconds: float) -> tuple[dict, float]:
    """One closed-loop client and library calls at batch 1 on the same images, taking turns in
    blocks of `TURN_S` (at least 3 calls): the service's summary, and the library's median
    latency (ms)."""
    screener.batch_size = 1
    calls, stream, i = [], await load.connect(), 0
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    try:
        with torch_settings(CPUS):
            while time.monotonic() < deadline:
                turn = time.monotonic() + TURN_S
                for k in range(len(calls), len(calls) + 3 * len(images)):
                    one = images[k % len(images)][None]
                    calls.append(_timed(lambda one=one: screener.screen(one)))
                    if k % 3 == 2 and time.monotonic() > turn:
                        break
                time.sleep(TURN_GAP_S)
                turn = time.monotonic() + TURN_S
                for _ in range(3 * len(images)):
                    stream = await load.send(stream, i, time.perf_counter())
                    i += 1
                    if i % 3 == 0 and time.monotonic() > turn:
                        break
                time.sleep(TURN_GAP_S)
    finally:
        stream[1].close()
    return load.summary(time.monotonic() - start, clients=1), float(np.median(calls)) * 1e3


async def _closed(load: _Load, clients: int, seconds: float) -> dict:
    """`clients` clients, each sending its next request when the last one returns."""
    deadline = time.monotonic() + seconds

    async def client(k: int) -> None:
        stream, i = await load.connect(), k
        try:
            while time.monotonic() < deadline:
                stream = await load.send(stream, i, time.perf_counter())
                i += clients
        finally:
            stream[1].close()

    start = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return load.summary(time.monotonic() - start, clients=clients)


async def _open(load: _Load, rate: float, seconds: float) -> dict:
    """Requests at a fixed rate; latency counts from each request's scheduled time."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(await load.connect())
    start = time.perf_counter() + 0.2

    async def at(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        stream = await pool.get()
        pool.put_nowait(await load.send(stream, i, scheduled))

    await asyncio.gather(*(at(i) for i in range(max(1, int(rate * seconds)))))
    wall = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait()[1].close()
    return load.summary(wall, rate=rate)


def _serve(screener: Path, model: str, mode: str, port: int, max_batch: int,
           log) -> subprocess.Popen:
    arguments, env = MODES[mode]
    threads = ["--num-cpus", str(CPUS)] if "--ray" in arguments else ["--cpus-per-replica",
                                                                        str(CPUS)]
    return subprocess.Popen(
        [sys.executable, "-m", "frmap.engine.cli", "serve", "--screener", str(screener),
         "--model", model, "--port", str(port), "--max-batch", str(max_batch),
         "--max-queued", "4096",
         *threads, *arguments], stdout=subprocess.DEVNULL, stderr=log,
        env={**os.environ, "RAY_ADDRESS": "", **env})


async def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    probe = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(probe)
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            if b" 200 " in line:
                return
        except (OSError, asyncio.TimeoutError, IndexError):
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the service did not become ready")


def _mode(case: Case, mode: str, path: Path, screener: Screener, bodies: list[bytes],
          images: torch.Tensor, max_batch: int) -> dict:
    """One ingress mode under every load, its 1-client latency beside the library's at batch 1
    taking turns with it; an error recorded where the mode does not start."""
    port = _free_port()
    log = path.with_name(f"{case.model}-{mode}.log")
    with log.open("w") as f:
        proc = _serve(path, case.model, mode, port, max_batch, f)
    try:
        asyncio.run(_wait_ready(port, proc, 300))
        sockets = listening_sockets(proc.pid)
        if mode in DIRECT:
            port = next((p for _, p in sockets if p in DIRECT_PORTS), port)
            asyncio.run(_wait_ready(port, proc, 60))
        single = _Load(port, bodies, 1)
        asyncio.run(_closed(_Load(port, bodies, 1), 2, min(case.seconds, 3.0)))  # warm-up
        one, library = asyncio.run(_paired(single, screener, images, case.seconds))
        loads = [asyncio.run(_closed(_Load(port, bodies, 1), c, case.seconds))
                 for c in case.clients]
        saturation = max(r["images_per_s"] for r in loads)
        filling = -(-max_batch // PER_REQUEST)  # requests that fill a pass
        batches = max((asyncio.run(_closed(_Load(port, bodies, PER_REQUEST), c, case.seconds))
                       for c in (filling, 2 * filling)), key=lambda r: r["images_per_s"])
        half = asyncio.run(_open(_Load(port, bodies, 1), saturation / 2, case.seconds))
        exposed = [f"{a}:{p}" for a, p in sockets if not ipaddress.ip_address(a).is_loopback]
        return {"mode": mode, "port": port, "library_batch1_ms": library, "one_client": one,
                "saturation": loads, "saturation_images_per_s": saturation, "multipart": batches,
                "half_load": half, "listening": len(sockets), "exposed": exposed}
    except (RuntimeError, OSError, ValueError, IndexError) as err:
        return {"mode": mode, "error": f"{type(err).__name__}: {err}; {_tail(log)}"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(case: Case, tmp: Path) -> dict:
    screener, bodies, images = _screener(case.model)
    library = _library(screener, images, case.library_batches)
    path = screener.save(tmp / f"{case.model}.frmap")
    return {"model": case.model, "library": library,
            "modes": [_mode(case, mode, path, screener, bodies, images, library["best_batch"])
                      for mode in case.modes]}


def run(quick: bool = False) -> dict:
    """Measure every case and mode; return the rows, the targets and the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_case(case, Path(tmp)) for case in (QUICK if quick else FULL)]
    return {"rows": rows, "targets": _targets(rows), "cpus": CPUS, "machine": machine.describe()}


# (what, model or None for every model, the value from a row and a mode, goal)
_GOALS = (
    ("p50 at 1 client - library batch 1, taking turns (ms)", None,
     lambda r, m: m["one_client"]["p50_ms"] - m["library_batch1_ms"], "<=", 3.0),
    ("saturation, 1 image/request / library best", "vgg19",
     lambda r, m: m["saturation_images_per_s"] / r["library"]["best_images_per_s"], ">=", 0.85),
    ("saturation, 1 image/request / library best", "digits",
     lambda r, m: m["saturation_images_per_s"] / r["library"]["best_images_per_s"], ">=", 0.6),
    (f"{PER_REQUEST} images/request / library best", "digits",
     lambda r, m: m["multipart"]["images_per_s"] / r["library"]["best_images_per_s"], ">=", 0.9),
    ("p99 / p50 at half load", None,
     lambda r, m: m["half_load"]["p99_ms"] / m["half_load"]["p50_ms"], "<=", 2.0),
)


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        for m in r["modes"]:
            if "error" in m:
                continue
            for what, model, value, op, goal in _GOALS:
                if model in (None, r["model"]):
                    v = float(value(r, m))
                    ok = v >= goal if op == ">=" else v <= goal
                    out.append({"model": r["model"], "mode": m["mode"],
                                "target": f"{m['mode']}, {what}",
                                "value": v, "goal": f"{op} {goal:g}",
                                "ok": bool(np.isfinite(v) and ok)})
    return out


def table(result: dict) -> str:
    """A terminal table: the machine, per model the library and each mode, then the targets."""
    lines = [machine.summary(result["machine"])]
    for r in result["rows"]:
        lib = r["library"]
        lines += [f"\n{r['model']}: library best {lib['best_images_per_s']:.1f} images/s at "
                  f"batch {lib['best_batch']} ("
                  + ", ".join(f"batch {b}: {v:.1f}" for b, v in lib["images_per_s"].items())
                  + ")",
                  f"{'mode':15} {'lib. b1 ms':>10} {'1 client p50/p99 ms':>20} {'added ms':>8} "
                  f"{'sat. img/s':>10} "
                  f"{f'x{PER_REQUEST} img/s':>10} {'half p99/p50':>12} {'listening':>9} "
                  f"{'beyond loopback':>15}"]
        for m in r["modes"]:
            if "error" in m:
                lines.append(f"{m['mode']:15} did not run: {m['error']}")
                continue
            one, half = m["one_client"], m["half_load"]
            added = float("nan") if one["added_p50_ms"] is None else one["added_p50_ms"]
            errors = sum(x["errors"] for x in (one, m["multipart"], half, *m["saturation"]))
            lines.append(f"{m['mode']:15} {m['library_batch1_ms']:10.2f} "
                         f"{one['p50_ms']:9.2f} / {one['p99_ms']:8.2f} "
                         f"{added:8.2f} "
                         f"{m['saturation_images_per_s']:10.1f} "
                         f"{m['multipart']['images_per_s']:10.1f} "
                         f"{half['p99_ms'] / half['p50_ms']:12.2f} {m['listening']:9d} "
                         f"{len(m['exposed']):15d}"
                         + (f"  ({errors} error replies)" if errors else ""))
    lines.append("")
    for t in result["targets"]:
        lines.append(f"{t['model']:7} {t['target']:60} {t['value']:8.2f} "
                     f"{t['goal']:>7} {'ok' if t['ok'] else 'MISSED'}")
    return "\n".join(lines)
