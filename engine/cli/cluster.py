"""What the `--ray` commands share: their arguments, the Ray instance and the worker pool."""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from frmap.engine.jobs.pool import WorkerPool, quiet_ray_data
from frmap.engine.models import model_device
from frmap.engine.models.named import NamedModel
from frmap.kernels.errors import FrmapError


@contextmanager
def ray_session(args: argparse.Namespace) -> Iterator[None]:
    """A local Ray instance (--num-cpus) or the cluster at --address, shut down afterwards.

    Raises:
        FrmapError: Ray is not installed, or nothing answers at --address.
        ValueError: an --address that is not auto or HOST:PORT.
    """
    try:
        import ray
    except ImportError as err:
        raise FrmapError(f"frmap {args.command} --ray needs Ray ({err}): "
                         "pip install 'frmap[serve]'") from None
    if args.address:
        _check_reachable(args.address)
    local = {} if args.address else {"num_cpus": args.num_cpus}
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, **local)
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast where a HOST:PORT address (or ray://HOST:PORT) does not accept a connection:
    Ray itself retries an unreachable address for minutes. "auto" is left to Ray.

    Raises:
        FrmapError: nothing listens at the address.
        ValueError: the address is not HOST:PORT.
    """
    target = address.removeprefix("ray://")
    if target == "auto":
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise FrmapError(f"--address {address}: no Ray cluster answers there ({err})") from None


def worker_pool(args: argparse.Namespace, model: NamedModel) -> WorkerPool:
    """The job's worker actors, in a Ray session: the model of the arguments on its device, one
    GPU each where it runs on CUDA."""
    where = model_device(model.model)
    return WorkerPool(model=args.model, weights=args.weights, seed=args.seed, device=str(where),
                      workers=args.workers, cpus=cpus_each(args, args.cpus_per_worker,
                                                           args.workers),
                      gpus=1.0 if where.type == "cuda" else 0.0)


def cpus_each(args: argparse.Namespace, asked: int | None, actors: int) -> int:
    """CPUs (and torch threads) for each of `actors` actors, in a Ray session: `asked`, or by
    default the local instance's CPUs shared among them (1 each on a cluster)."""
    import ray

    if asked is not None:
        return asked
    return 1 if args.address else max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
