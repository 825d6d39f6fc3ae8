"""Local spatial entropy of images and volumes: `local_entropy` and `mean_local_entropy`.

numpy arrays (and host DLPack arrays) go to a backend's numpy function; torch tensors (and
device DLPack arrays) go to the backend's registered torch operator (`frmap.kernels.torch_ops`),
so that the same call runs under torch.compile and torch.export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._arrays import check_array, dtype_name, for_backend, for_caller, from_dlpack, is_tensor
from ._dispatch import implementation
from ._rank_input import RANK_DTYPES, as_rank_image, rank_footprint

if TYPE_CHECKING:
    from ._arrays import Array

_OUT_DTYPES = ("float32", "float64")


def _check_image(image: Array, ndim: int, name: str) -> Array:
    """The image as uint8/uint16 (scikit-image's conversion), checked against a footprint of
    `ndim` dims."""
    check_array(image, name)
    if image.ndim < ndim:
        dims = "[..., H, W]" if ndim == 2 else "[..., D, H, W]"
        raise ValueError(
            f"{name} must have shape {dims} for a {ndim}-D footprint, got shape "
            f"{tuple(image.shape)}"
        )
    if 0 in image.shape[-ndim:]:
        raise ValueError(f"{name} has an empty spatial shape {tuple(image.shape[-ndim:])}")
    if dtype_name(image) not in RANK_DTYPES:
        image = for_caller(as_rank_image(for_backend(image, "cpu"), ndim == 3, name), image)
    return image


def _validate_mask(mask: Array | None, image: Array, ndim: int) -> Array | None:
    """Return the mask broadcast to the image's shape, as uint8 (nonzero = pixel counts)."""
    if mask is None:
        return None
    mask, _ = from_dlpack(mask, "mask")
    check_array(mask, "mask")
    if tuple(mask.shape) not in (tuple(image.shape), tuple(image.shape[-ndim:])):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} matches neither the image shape "
            f"{tuple(image.shape)} nor its spatial shape {tuple(image.shape[-ndim:])}"
        )
    if is_tensor(image):
        import torch

        m = torch.as_tensor(mask, device=image.device) != 0
        return m.to(torch.uint8).expand(image.shape)
    m = (mask.detach().cpu().numpy() if is_tensor(mask) else mask) != 0
    return np.broadcast_to(m.astype(np.uint8), image.shape)


def _out_dtype(out_dtype: object, out: Array | None, like: Array) -> str:
    """The output dtype's name: `out_dtype`, else `out`'s dtype, else float64."""
    if out is not None:
        check_array(out, "out")
        if type(out) is not type(like) or tuple(out.shape) != tuple(like.shape):
            raise ValueError(
                f"out must be a {type(like).__name__} of shape {tuple(like.shape)}, got a "
                f"{type(out).__name__} of shape {tuple(out.shape)}"
            )
        if dtype_name(out) not in _OUT_DTYPES:
            raise TypeError(f"out must be float32 or float64, got {dtype_name(out)}")
    if out_dtype is None:
        return "float64" if out is None else dtype_name(out)
    name = str(out_dtype).removeprefix("torch.")
    if name not in _OUT_DTYPES:
        try:
            name = np.dtype(out_dtype).name
        except TypeError:
            pass
    if name not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be float32 or float64, got {out_dtype!r}")
    if out is not None and dtype_name(out) != name:
        raise TypeError(f"out is {dtype_name(out)}, but out_dtype is {name}")
    return name


def _entropy(op: str, images: Array, footprint: Array, mask: Array | None,
             shifts: tuple[int, int, int], backend: str, name: str, *out_dtype: str) -> Array:
    """`op` ("local_entropy" or "mean_local_entropy") on [..., spatial] images: flattened to
    [N, spatial], run by the backend (its torch operator for tensors), unflattened."""
    check_array(images, name)
    if backend == "triton" and not is_tensor(images):  # Triton computes on tensors
        return for_caller(_entropy(op, for_backend(images, "triton"), footprint, mask, shifts,
                                   backend, name, *out_dtype), images)
    if is_tensor(images):
        from . import torch_ops

        values, shape = torch_ops.footprint_constant(footprint, shifts)
    else:
        values = rank_footprint(footprint, shifts)
        shape = values.shape
    ndim = len(shape)
    images = _check_image(images, ndim, name)
    mask = _validate_mask(mask, images, ndim)
    spatial = images.shape[-ndim:]
    kept = images.shape if op == "local_entropy" else images.shape[:-ndim]
    if is_tensor(images):
        backend = torch_ops.backend_constant(backend, "entropy", str(images.device),
                                             str(images.dtype))
    else:
        backend, module = implementation("entropy", backend, images)
    if ndim == 3 and backend == "triton":
        raise ValueError(
            "backend 'triton' computes 2-D footprints only; use backend='cpu' or 'reference' "
            "for a 3-D footprint"
        )
    flat = images.reshape(-1, *spatial)
    flat_mask = None if mask is None else mask.reshape(-1, *spatial)
    if is_tensor(images):
        import torch

        call = torch_ops.operator(op, backend)
        flat_mask = None if flat_mask is None else flat_mask.contiguous()
        dtypes = [getattr(torch, d) for d in out_dtype]
        return call(flat.contiguous(), list(values), list(shape), flat_mask, *dtypes).reshape(kept)
    flat_mask = None if flat_mask is None else np.ascontiguousarray(flat_mask)
    result = getattr(module, op)(np.ascontiguousarray(flat), values, flat_mask,
                                 *map(np.dtype, out_dtype))
    return result.reshape(kept)


def local_entropy(
    image: Array,
    footprint: Array,
    *,
    mask: Array | None = None,
    out: Array | None = None,
    out_dtype: object = None,
    shift_x: int = 0,
    shift_y: int = 0,
    shift_z: int = 0,
    backend: str = "auto",
) -> Array:
    """Local entropy in bits, a drop-in for `skimage.filters.rank.entropy`.

    For each pixel, `S = -sum_v p_v log2 p_v` over the normalised histogram `p` of the pixels
    that the footprint covers around it (uint8: 256 bins; uint16: `max + 1` bins, at least 4).
    The window is centred at `(h // 2 + shift_y, w // 2 + shift_x)` of a 2-D footprint, and at
    `(d // 2 + shift_x, h // 2 + shift_y, w // 2 + shift_z)` of a 3-D one (scikit-image's axis
    order); it shrinks at the border (no padding); pixels where
    `mask` is zero are left out of every window; a window with no pixel gives 0. A window of
    2**k equally frequent values gives exactly k bits.

    Other dtypes are converted as scikit-image does (`img_as_ubyte`, with its UserWarning
    "Possible precision loss"): floats in [-1, 1] -> `rint(x * 255)` clipped at 0, signed and
    wider integers -> their top 8 bits (kept as they are when all below 256), negatives -> 0,
    bool -> 0 / 255 (refused with a 2-D footprint, as scikit-image does).

    Args:
        image: [..., H, W] with a 2-D footprint (leading dims are a batch of images), or
            [..., D, H, W] with a 3-D footprint (leading dims are a batch of volumes); numpy,
            torch (under torch.compile and torch.export too: uint8/uint16), or any DLPack
            array (CuPy: computed on its GPU without a host copy).
        footprint: [h, w] or [d, h, w] binary (bool or 0/1) with at least one element set.
            Under torch.compile its values are read once, when the function is traced, and
            become constants of the graph: keep one footprint per compiled function (a new
            shape recompiles; new values of the same shape are not seen).
        mask: the image's shape or its spatial shape; nonzero marks the pixels that count.
        out: float32 or float64 array of the image's kind and shape to write into.
        out_dtype: float64 (the default, scikit-image's) or float32 (the float64 values
            rounded once), as a name, numpy or torch dtype; default: `out`'s dtype if given.
        shift_x, shift_y, shift_z: offsets of the footprint's centre, as above (shift_z: 3-D
            footprints only); the centre must stay inside the footprint.
        backend: "auto", "reference", "cpu" or "triton" (2-D footprints only); see
            `frmap.kernels.resolve_backend`.

    Returns:
        The entropy in the image's shape and `out_dtype`, the same kind of array as `image`
        (numpy; a torch tensor on the image's device; the DLPack array's own kind on its
        device), or `out`.
    """
    dtype = _out_dtype(out_dtype, out, image)
    array, back = from_dlpack(image, "image")
    result = back(_entropy("local_entropy", array, footprint, mask, (shift_x, shift_y, shift_z),
                           backend, "image", dtype))
    if out is None:
        return result
    out[...] = result
    return out


def mean_local_entropy(
    images: Array,
    footprint: Array,
    *,
    mask: Array | None = None,
    shift_x: int = 0,
    shift_y: int = 0,
    shift_z: int = 0,
    backend: str = "auto",
) -> Array:
    """Mean of each image's (or volume's) local-entropy map, without materialising the map.

    Equal to `local_entropy(images, footprint, mask=mask).mean(axis=(-2, -1))` for a 2-D
    footprint, and to the mean over the last three axes for a 3-D one.

    Args:
        images: [..., H, W] (2-D footprint) or [..., D, H, W] (3-D footprint), numpy, torch or
            DLPack, as for `local_entropy`.
        footprint, mask, shift_x, shift_y, shift_z, backend: as for `local_entropy`.

    Returns:
        [...] float64 scores, the same kind of array as `images`.
    """
    array, back = from_dlpack(images, "images")
    return back(_entropy("mean_local_entropy", array, footprint, mask,
                         (shift_x, shift_y, shift_z), backend, "images"))
