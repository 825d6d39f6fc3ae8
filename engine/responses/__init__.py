"""Feature responses: what a ReLU rule back-propagates from a target to the images, by the
reverse walk or by autograd, and their entropy scores (`ResponseEngine`)."""

from frmap.engine.responses.engine import (
    PATHS,
    PRECISIONS,
    EngineConfig,
    ResponseEngine,
    resolve_precision,
)
from frmap.engine.responses.targets import TARGETS

__all__ = ["PATHS", "PRECISIONS", "TARGETS", "EngineConfig", "ResponseEngine",
           "resolve_precision"]
