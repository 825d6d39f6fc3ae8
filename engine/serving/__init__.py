"""The screening service: a screener behind HTTP on Ray Serve (`frmap serve`)."""

from frmap.engine.serving.service import ScreeningService, ServiceConfig, service

__all__ = ["ScreeningService", "ServiceConfig", "service"]
