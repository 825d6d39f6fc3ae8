"""The screening service (`frmap serve`): a screener behind HTTP, in one process under uvicorn
(`local`) or on Ray Serve replicas (`cluster`), one request path for both (`core`)."""

from frmap.engine.serving.core import ScreeningApp, ServiceConfig

__all__ = ["ScreeningApp", "ServiceConfig"]
