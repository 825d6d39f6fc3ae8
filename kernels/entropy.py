"""Local spatial entropy of integer images: `local_entropy` and `mean_local_entropy`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._arrays import check_array, dtype_name, footprint_array, for_backend, for_caller, is_tensor
from ._dispatch import implementation

if TYPE_CHECKING:
    from ._arrays import Array

_IMAGE_DTYPES = ("uint8", "uint16")
_OUT_DTYPES = ("float32", "float64")


def _validate_images(image: Array, name: str = "image") -> None:
    check_array(image, name)
    if dtype_name(image) not in _IMAGE_DTYPES:
        raise TypeError(
            f"{name} must be uint8 or uint16, got {dtype_name(image)}; convert it first "
            "(e.g. skimage.util.img_as_ubyte)"
        )
    if image.ndim < 2:
        raise ValueError(f"{name} must have shape [..., H, W], got shape {tuple(image.shape)}")
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"{name} has an empty spatial shape {tuple(image.shape[-2:])}")


def _validate_mask(mask: Array | None, image: Array) -> Array | None:
    """Return the mask broadcast to the image's shape, as uint8 (nonzero = pixel counts)."""
    if mask is None:
        return None
    check_array(mask, "mask")
    if tuple(mask.shape) not in (tuple(image.shape), tuple(image.shape[-2:])):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} matches neither the image shape "
            f"{tuple(image.shape)} nor its spatial shape {tuple(image.shape[-2:])}"
        )
    if is_tensor(image):
        import torch

        m = torch.as_tensor(mask, device=image.device) != 0
        return m.to(torch.uint8).expand(image.shape)
    m = (mask.detach().cpu().numpy() if is_tensor(mask) else mask) != 0
    return np.broadcast_to(m.astype(np.uint8), image.shape)


def _dispatch(images: Array, mask: Array | None, backend: str):
    name, module = implementation("entropy", backend, images)
    h, w = images.shape[-2:]
    flat = for_backend(images, name).reshape(-1, h, w)
    flat_mask = None if mask is None else for_backend(mask, name).reshape(-1, h, w)
    return module, flat, flat_mask


def local_entropy(
    image: Array,
    footprint: Array,
    *,
    mask: Array | None = None,
    out: Array | None = None,
    backend: str = "auto",
) -> Array:
    """Local spatial entropy in bits, the contract of `skimage.filters.rank.entropy`.

    For each pixel, `S = -sum_v p_v log2 p_v` over the normalised histogram `p` of the pixels
    that the footprint covers around it (uint8: 256 bins; uint16: `max + 1` bins). The window
    is centred at `(h // 2, w // 2)` of the footprint and shrinks at the image border (no
    padding); pixels where `mask` is zero are left out of every window; a window with no pixel
    gives 0.

    Args:
        image: [..., H, W] uint8 or uint16, numpy or torch; leading dims are a batch.
        footprint: [h, w] binary (bool or 0/1), any shape with at least one element set.
        mask: [..., H, W] or [H, W]; nonzero marks the pixels that count.
        out: [..., H, W] float32 or float64 array of the same kind to write into; its dtype
            sets the output precision (default float64).
        backend: "auto", "reference", "cpu" or "triton" (see `frmap.kernels.resolve_backend`).

    Returns:
        [..., H, W] entropy (float64 unless `out` says otherwise), the same kind of array as
        `image` (numpy, or a torch tensor on the image's device).
    """
    _validate_images(image)
    fp = footprint_array(footprint)
    flat_mask = _validate_mask(mask, image)
    out_dtype = np.dtype(np.float64)
    if out is not None:
        check_array(out, "out")
        if type(out) is not type(image) or tuple(out.shape) != tuple(image.shape):
            raise ValueError(
                f"out must be a {type(image).__name__} of shape {tuple(image.shape)}, got a "
                f"{type(out).__name__} of shape {tuple(out.shape)}"
            )
        if dtype_name(out) not in _OUT_DTYPES:
            raise TypeError(f"out must be float32 or float64, got {dtype_name(out)}")
        out_dtype = np.dtype(dtype_name(out))
    module, flat, flat_mask = _dispatch(image, flat_mask, backend)
    result = for_caller(module.local_entropy(flat, fp, flat_mask, out_dtype), image)
    result = result.reshape(image.shape)
    if out is None:
        return result
    out[...] = result
    return out


def mean_local_entropy(
    images: Array, footprint: Array, *, mask: Array | None = None, backend: str = "auto"
) -> Array:
    """Mean of each image's local-entropy map, without materialising the map.

    Equal to `local_entropy(images, footprint, mask=mask).mean(axis=(-2, -1))`.

    Args:
        images: [..., H, W] uint8 or uint16, numpy or torch.
        footprint, mask, backend: as for `local_entropy`.

    Returns:
        [...] float64 scores, the same kind of array as `images`.
    """
    _validate_images(images, "images")
    fp = footprint_array(footprint)
    module, flat, flat_mask = _dispatch(images, _validate_mask(mask, images), backend)
    return for_caller(module.mean_local_entropy(flat, fp, flat_mask), images).reshape(
        images.shape[:-2]
    )
