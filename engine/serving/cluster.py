"""The service on Ray Serve (`frmap serve --address ...`): replicas of the same application
(`ScreeningApp`), each with its own model and batcher."""

from __future__ import annotations

from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.requests import Request
from starlette.responses import Response

from frmap.engine.serving.core import ScreeningApp, ServiceConfig


@serve.deployment(name="frmap-screener")
class ScreeningReplica:
    """One replica: the model and screener loaded once; requests through `ScreeningApp`."""

    def __init__(self, screener: bytes, config: ServiceConfig, token: str | None) -> None:
        self.app = ScreeningApp(screener, config, token)

    async def __call__(self, request: Request) -> Response:
        return await self.app.handle(request)


def ray_application(screener: bytes, config: ServiceConfig,
                    token: str | None = None) -> serve.Application:
    """The Ray Serve application of a screener file's bytes.

    A replica takes up to `max_queued + max_batch` requests at once (Ray's default of 5 would
    cap the batches): its own batcher queues them and answers 503 beyond `max_queued` images;
    Ray's router answers 503 beyond as many more.
    """
    options = {"num_replicas": config.replicas, "max_queued_requests": config.max_queued,
               "max_ongoing_requests": config.max_queued + config.max_batch,
               "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
               "ray_actor_options": {"num_cpus": config.cpus, "num_gpus": config.gpus}}
    return ScreeningReplica.options(**options).bind(screener, config, token)
