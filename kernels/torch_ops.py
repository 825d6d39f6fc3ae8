"""frmap's ops as torch operators, so that torch.compile and torch.export take them whole.

Two operators per backend, `frmap::local_entropy_<backend>` and
`frmap::mean_local_entropy_<backend>`:

| backend | registered with | runs |
|---|---|---|
| cpu | `torch.library.custom_op` (opaque) | the C++ kernels on CPU tensors |
| reference | `custom_op` (opaque) | scikit-image on host copies, any device |
| triton | `torch.library.triton_op` | the Triton kernels through `wrap_triton`, seen by compile |

Each takes validated [N, H, W] (or [N, D, H, W], not triton) uint8/uint16 contiguous images,
the footprint as its flattened 0/1 values and its shape (constants of a compiled graph, as the
Triton kernels need them), an optional uint8 mask of the images' shape, and (local_entropy)
the output dtype. `frmap.kernels.local_entropy` and `mean_local_entropy` call them for tensors,
in eager mode too, so compiled and eager results are the same numbers.

The ReLU rules' and pooling's kernels are operators too, one per backend, that write into
outputs their caller allocated: `frmap::relu_forward_<backend>`, `relu_backward_<backend>`
(cpu, torch, triton) and `max_pool_<backend>`, `max_unpool_<backend>` (cpu, torch). Their
callers (`frmap.kernels.relu_rules`, `.pooling`) call them while torch.compile or torch.export
traces (`kernel`), and the backend's function directly in eager mode: the reverse walk calls
them dozens of times per image, and a registered call costs microseconds more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch.library import custom_op, triton_op

from ._dispatch import backend_module, interpreting, resolve_for
from ._rank_input import rank_footprint


@torch.compiler.assume_constant_result
def backend_constant(backend: str, family: str, device: str, dtype: str) -> str:
    """`family`'s backend for a tensor of `dtype` on `device` (`resolve_for`), decided once
    while a graph is traced (the decision imports modules, which torch.compile cannot trace)."""
    return resolve_for(backend, family, device, dtype)


@torch.compiler.assume_constant_result
def footprint_constant(footprint: object,
                       shifts: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(flattened 0/1 values, shape) of the validated, shifted footprint (`rank_footprint`).

    Under torch.compile a numpy footprint would be a graph input whose values no kernel may
    depend on when it is traced (the Triton kernels unroll over them); this function runs once
    while the graph is traced, and its result is a constant of the graph.
    """
    fp = rank_footprint(footprint, shifts)
    return tuple(fp.ravel().tolist()), fp.shape


def _footprint(values: list[int], shape: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8).reshape(shape)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


# The entropy operators' schemas: the footprint as its flattened 0/1 values and its shape.
_ENTROPY_SCHEMAS = {
    "local_entropy": "(Tensor images, int[] footprint, int[] shape, Tensor? mask, "
                     "ScalarType out_dtype) -> Tensor",
    "mean_local_entropy": "(Tensor images, int[] footprint, int[] shape, Tensor? mask) -> Tensor",
}


def _entropy_op(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The operator of `op` on `backend`: the Triton kernels on the tensors themselves; a
    numpy backend on their host copies (views on the CPU), the result on the images' device."""

    def run(images: torch.Tensor, footprint: list[int], shape: list[int],
            mask: torch.Tensor | None, *out_dtype: torch.dtype) -> torch.Tensor:
        compute = getattr(backend_module("entropy", backend), op)
        fp, dtypes = _footprint(footprint, shape), map(_numpy_dtype, out_dtype)
        if backend == "triton":
            return compute(images, fp, mask, *dtypes)
        host_mask = None if mask is None else mask.cpu().numpy()
        out = compute(images.cpu().numpy(), fp, host_mask, *dtypes)
        return torch.from_numpy(out).to(images.device)

    return run


def _entropy_fake(images: torch.Tensor, footprint: list[int], shape: list[int],
                  mask: torch.Tensor | None, *out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype:  # local_entropy: the map
        return images.new_empty(images.shape, dtype=out_dtype[0])
    return images.new_empty(images.shape[:1], dtype=torch.float64)


def _register(op: str, backend: str, fn: Callable, schema: str, mutated: tuple[str, ...],
              fake: Callable) -> None:
    """`frmap::<op>_<backend>`: triton_op for Triton, else custom_op (the cpu backend's for
    CPU tensors only), with its fake function."""
    name = f"frmap::{op}_{backend}"
    if backend == "triton":
        registered = triton_op(name, fn, mutates_args=mutated, schema=schema)
    else:
        registered = custom_op(name, fn, mutates_args=mutated, schema=schema,
                               device_types="cpu" if backend == "cpu" else None)
    registered.register_fake(fake)


for _op, _schema in _ENTROPY_SCHEMAS.items():
    for _backend in ("cpu", "reference", "triton"):
        _register(_op, _backend, _entropy_op(_op, _backend), _schema, (), _entropy_fake)


def operator(op: str, backend: str) -> torch._ops.OpOverloadPacket:
    """The registered operator of `op` ("local_entropy" or "mean_local_entropy") on
    `backend` ("cpu", "reference" or "triton")."""
    return getattr(torch.ops.frmap, f"{op}_{backend}")


# The walk's kernels: (family, schema, mutated arguments, backends).
_WALK_OPS = {
    "relu_forward": ("relu", "(Tensor x, Tensor(a!) y, Tensor(b!)? bits) -> ()", ("y", "bits"),
                     ("cpu", "torch", "triton")),
    "relu_backward": ("relu", "(Tensor g, Tensor? bits, Tensor(a!) out, str rule) -> ()",
                      ("out",), ("cpu", "torch", "triton")),
    "max_pool": ("pooling", "(Tensor x, Tensor(a!) y, Tensor(b!) offsets, int[] kernel, "
                 "bool channels_last, bool dead_first) -> ()", ("y", "offsets"), ("cpu", "torch")),
    "max_unpool": ("pooling", "(Tensor r, Tensor offsets, Tensor(a!) out, int[] kernel, "
                   "bool channels_last) -> ()", ("out",), ("cpu", "torch")),
}


def _walk_op(family: str, op: str, backend: str) -> Callable[..., None]:
    def run(*args: object) -> None:
        getattr(backend_module(family, backend), op)(*args)

    return run


def _no_output(*args: object) -> None:
    return None


for _op, (_family, _schema, _mutated, _backends) in _WALK_OPS.items():
    for _backend in _backends:
        _register(_op, _backend, _walk_op(_family, _op, _backend), _schema, _mutated,
                  _no_output)


def kernel(family: str, op: str, backend: str, data: torch.Tensor) -> Callable[..., None]:
    """The kernel that runs `op` of `family` ("relu" or "pooling") on `data` for `backend`:
    its registered operator while torch.compile or torch.export traces, else the backend's
    function itself (the same computation, without the operator's microseconds per call)."""
    if torch.compiler.is_compiling():
        name = backend_constant(backend, family, str(data.device), str(data.dtype))
        return getattr(torch.ops.frmap, f"{op}_{name}")
    return _direct(family, op, backend, str(data.device), str(data.dtype), interpreting())


@functools.cache
def _direct(family: str, op: str, backend: str, device: str, dtype: str,
            interpret: bool) -> Callable[..., None]:
    """The backend's function of `op` for data of `dtype` on `device`, looked up once: the
    reverse walk calls these kernels dozens of times per image."""
    return getattr(backend_module(family, resolve_for(backend, family, device, dtype)), op)
