"""The service on one machine: the application in this process under uvicorn, no Ray."""

from __future__ import annotations

import uvicorn

from frmap.engine.serving.core import ScreeningApp


def local_server(app: ScreeningApp, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server of `app` on `host:port` (one process, one event loop, no access log).

    Its `serve()` runs until SIGINT or SIGTERM, then finishes the requests under way.
    Connections beyond the queue's bound are refused by uvicorn with 503 as well.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_keep_alive=5,
                            limit_concurrency=app.config.max_queued + app.config.max_batch + 64,
                            timeout_graceful_shutdown=max(5, int(app.config.timeout_s)))
    return uvicorn.Server(config)
