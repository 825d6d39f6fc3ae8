"""What the batch jobs and the service share: the checks of their settings and the screener
sent as a file's bytes to a worker or replica in another process."""

from __future__ import annotations

import tempfile
from pathlib import Path

from frmap.engine.models.named import NamedModel
from frmap.engine.screening import Screener


def check_positive(config: object, *names: str) -> None:
    """Raise ValueError unless each field `names` of `config` is a positive integer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def load_screener(data: bytes, named: NamedModel, batch_size: int) -> Screener:
    """The screener of a file's bytes (as sent to a worker or replica), on `named`'s model."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "screener.frmap"
        path.write_bytes(data)
        return Screener.load(path, named.model, preprocess=named.preprocess,
                             batch_size=batch_size)
