"""Which implementation runs an op: one backend table and one `auto` policy for every op family.

| family | public ops | backends |
|---|---|---|
| entropy | local_entropy, mean_local_entropy | reference, cpu, triton |
| response | response_to_image, response_score | reference, cpu, triton |
| relu | relu_forward, relu_backward (and relu_rule, ReLURule, swap_relus) | torch, cpu, triton |
| pooling | max_pool_offsets, max_unpool_offsets | torch, cpu |
| denoise | nl_means | reference, cpu |

`auto`, the same policy for every family, takes the first of these that runs the data:

1. `triton`, for CUDA tensors, where the family has a Triton kernel and triton is installed;
2. `cpu`, the C++ kernels, for CPU data they take (numpy arrays or CPU tensors; float32/float64
   tensors for relu and pooling), where the extension is built;
3. the family's fallback, which runs whatever it is given: `reference` (scikit-image, numpy and
   PIL; tensors are copied to the host) for entropy and response, `torch` (eager torch ops on
   the data's device) for relu and pooling.

A backend named explicitly runs or raises, and never falls back: ValueError when it does not take
the data, FrmapError when it is not installed or built here. A backend's module is imported only
when it is chosen, so torch and triton are imported only for tensors or for a backend that needs
them.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

from ._arrays import is_tensor
from .errors import FrmapError

# family -> backend -> the module that implements it; the first backend is the fallback.
_TABLE = {
    "entropy": {"reference": "reference", "cpu": "cpu", "triton": "triton.entropy"},
    "response": {"reference": "reference", "cpu": "cpu", "triton": "triton.response"},
    "relu": {"torch": "eager.relu", "cpu": "cpu", "triton": "triton.relu"},
    "pooling": {"torch": "eager.pooling", "cpu": "cpu"},
    "denoise": {"reference": "reference", "cpu": "cpu"},
}

BACKENDS = ("auto", *_TABLE["entropy"])  # entropy and response
RULE_BACKENDS = ("auto", *_TABLE["relu"])
POOL_BACKENDS = ("auto", *_TABLE["pooling"])

# The distributions whose import names differ from their own (what to install for a missing one).
_PACKAGES = {"skimage": "scikit-image", "PIL": "pillow"}


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def unavailable_reason(backend: str, family: str = "entropy") -> str | None:
    """Why `backend` cannot run `family` in this installation, or None when it can."""
    try:
        _import(family, backend)
    except ImportError as err:
        if backend == "cpu":
            return f"the C++ extension frmap.kernels.cpu._ext is not built ({err})"
        top = (err.name or str(err)).partition(".")[0]
        package = _PACKAGES.get(top, top)
        return (f"it needs {package}, which is not installed: install frmap's engine extra, "
                "pip install 'frmap[engine]'")
    return None


def _import(family: str, backend: str) -> ModuleType:
    return importlib.import_module(f"frmap.kernels.{_TABLE[family][backend]}")


def _refusal(family: str, backend: str, device: str | None, dtype: str) -> str | None:
    """Why `backend` does not take data of `dtype` on `device` (None: a host array), or None
    when it does."""
    if backend == "cpu" and family in ("relu", "pooling"):
        if device != "cpu" or dtype not in ("torch.float32", "torch.float64"):
            return f"the cpu backend takes float32/float64 CPU tensors, got {dtype} on {device}"
    elif backend == "cpu" and device not in (None, "cpu"):
        return f"the cpu backend takes CPU data, got a tensor on {device}"
    elif backend == "triton" and not _on_cuda(device) and not interpreting():
        return "the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    return None


def _on_cuda(device: str | None) -> bool:
    return device is not None and device.startswith("cuda")


def _runs(family: str, backend: str, device: str | None, dtype: str) -> bool:
    return (_refusal(family, backend, device, dtype) is None
            and unavailable_reason(backend, family) is None)


def check_backend(backend: str, family: str) -> None:
    """Raise ValueError unless `backend` is "auto" or one of `family`'s backends."""
    names = ("auto", *_TABLE[family])
    if backend not in names:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(names)}")


def resolve_backend(backend: str, data: object, *, family: str = "entropy") -> str:
    """The backend that runs `family`'s op on `data` when `backend` is asked for.

    Args:
        backend: "auto" or one of the family's backends (see the module docstring).
        data: the op's main input, a numpy array or a torch tensor.
        family: "entropy", "response", "relu" or "pooling".

    Raises:
        ValueError: unknown backend, or a named backend that does not take `data`.
        FrmapError: a named backend that is not installed or built here.
    """
    device = str(data.device) if is_tensor(data) else None
    return resolve_for(backend, family, device, str(data.dtype))


def resolve_for(backend: str, family: str, device: str | None, dtype: str) -> str:
    """`resolve_backend` for data of `dtype` (as str() spells it) on `device` (str() of a
    tensor's device; None for a host array). The answer depends on nothing else in a process
    (and whether Triton interprets), so it is looked up once per combination: the reverse
    walk asks dozens of times per image."""
    return _resolved(backend, family, device, dtype, interpreting())


@functools.cache
def _resolved(backend: str, family: str, device: str | None, dtype: str,
              interpret: bool) -> str:
    check_backend(backend, family)
    if backend == "auto":
        if (_on_cuda(device) and "triton" in _TABLE[family]
                and _runs(family, "triton", device, dtype)):
            return "triton"
        if _runs(family, "cpu", device, dtype):
            return "cpu"
        backend = next(iter(_TABLE[family]))
    if reason := _refusal(family, backend, device, dtype):
        raise ValueError(reason)
    if reason := unavailable_reason(backend, family):
        raise FrmapError(f"the {backend} backend is unavailable: {reason}")
    return backend


def implementation(family: str, backend: str, data: object) -> tuple[str, ModuleType]:
    """The backend that runs `family`'s op on `data` (see `resolve_backend`), and its module."""
    name = resolve_backend(backend, data, family=family)
    return name, backend_module(family, name)


def backend_module(family: str, backend: str) -> ModuleType:
    """The module that implements `family` on `backend` (imported now)."""
    return _import(family, backend)
