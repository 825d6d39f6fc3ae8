"""What the batch jobs and the service share: the classifier each of their processes loads and
what it runs on, the checks of their settings, and the screener sent as a file's bytes to a
worker or replica in another process."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from frmap.engine.models.named import NamedModel, load_model
from frmap.engine.screening import Screener


def check_positive(config: object, *names: str) -> None:
    """Raise ValueError unless each field `names` of `config` is a positive integer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelHost:
    """The classifier a worker or replica process loads once, and what that process takes.

    Attributes:
        model, weights, seed: the classifier (`frmap.engine.models.named.load_model`); a
            weights file must be readable on every node of a cluster.
        device: "cpu", "cuda" or "cuda:N".
        cpus: CPUs each process takes, and the torch threads it runs (Ray gives a process that
            asks for none a single thread).
        gpus: GPUs each process takes.
    """

    model: str = "digits"
    weights: str | None = None
    seed: int = 0
    device: str = "cpu"
    cpus: int = 1
    gpus: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "cpus")
        if not self.gpus >= 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus!r}")

    def load(self) -> NamedModel:
        """The classifier, on `device`, in eval mode."""
        return load_model(self.model, self.weights, seed=self.seed, device=self.device)


def load_screener(data: bytes, named: NamedModel, batch_size: int,
                  compile: bool = False) -> Screener:
    """The screener of a file's bytes (as sent to a worker or replica), on `named`'s model
    (`batch_size` and `compile` as for `Screener`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "screener.frmap"
        path.write_bytes(data)
        return Screener.load(path, named.model, preprocess=named.preprocess,
                             batch_size=batch_size, compile=compile)
