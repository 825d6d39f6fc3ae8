"""Local spatial entropy of images and volumes: `local_entropy` and `mean_local_entropy`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._arrays import check_array, dtype_name, footprint_array, for_backend, for_caller, is_tensor
from ._dispatch import implementation

if TYPE_CHECKING:
    from ._arrays import Array
from ._rank_input import RANK_DTYPES, as_rank_image, shifted_footprint

_OUT_DTYPES = ("float32", "float64")


def _validate(
    image: Array, footprint: Array, shifts: tuple[int, int, int], name: str
) -> tuple[Array, np.ndarray]:
    """The image as uint8/uint16 (scikit-image's conversion) and the shifted uint8 footprint."""
    check_array(image, name)
    fp = footprint_array(footprint, ndims=(2, 3))
    if image.ndim < fp.ndim:
        dims = "[..., H, W]" if fp.ndim == 2 else "[..., D, H, W]"
        raise ValueError(
            f"{name} must have shape {dims} for a {fp.ndim}-D footprint, got shape "
            f"{tuple(image.shape)}"
        )
    if 0 in image.shape[-fp.ndim:]:
        raise ValueError(f"{name} has an empty spatial shape {tuple(image.shape[-fp.ndim:])}")
    if dtype_name(image) not in RANK_DTYPES:
        image = for_caller(as_rank_image(for_backend(image, "cpu"), fp.ndim == 3, name), image)
    return image, shifted_footprint(fp, shifts)


def _validate_mask(mask: Array | None, image: Array, ndim: int) -> Array | None:
    """Return the mask broadcast to the image's shape, as uint8 (nonzero = pixel counts)."""
    if mask is None:
        return None
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


def _dispatch(images: Array, mask: Array | None, ndim: int, backend: str):
    name, module = implementation("entropy", backend, images)
    if ndim == 3 and name == "triton":
        raise ValueError(
            "backend 'triton' computes 2-D footprints only; use backend='cpu' or 'reference' "
            "for a 3-D footprint"
        )
    spatial = images.shape[-ndim:]
    flat = for_backend(images, name).reshape(-1, *spatial)
    flat_mask = None if mask is None else for_backend(mask, name).reshape(-1, *spatial)
    return module, flat, flat_mask


def local_entropy(
    image: Array,
    footprint: Array,
    *,
    mask: Array | None = None,
    out: Array | None = None,
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
            [..., D, H, W] with a 3-D footprint (leading dims are a batch of volumes); numpy or
            torch.
        footprint: [h, w] or [d, h, w] binary (bool or 0/1) with at least one element set.
        mask: the image's shape or its spatial shape; nonzero marks the pixels that count.
        out: float32 or float64 array of the image's kind and shape to write into; its dtype
            sets the output precision (default float64).
        shift_x, shift_y, shift_z: offsets of the footprint's centre, as above (shift_z: 3-D
            footprints only); the centre must stay inside the footprint.
        backend: "auto", "reference", "cpu" or "triton" (2-D footprints only); see
            `frmap.kernels.resolve_backend`.

    Returns:
        The entropy in the image's shape (float64 unless `out` says otherwise), the same kind of
        array as `image` (numpy, or a torch tensor on the image's device).
    """
    image, fp = _validate(image, footprint, (shift_x, shift_y, shift_z), "image")
    flat_mask = _validate_mask(mask, image, fp.ndim)
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
    module, flat, flat_mask = _dispatch(image, flat_mask, fp.ndim, backend)
    result = for_caller(module.local_entropy(flat, fp, flat_mask, out_dtype), image)
    result = result.reshape(image.shape)
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
        images: [..., H, W] (2-D footprint) or [..., D, H, W] (3-D footprint), numpy or torch.
        footprint, mask, shift_x, shift_y, shift_z, backend: as for `local_entropy`.

    Returns:
        [...] float64 scores, the same kind of array as `images`.
    """
    images, fp = _validate(images, footprint, (shift_x, shift_y, shift_z), "images")
    flat_mask = _validate_mask(mask, images, fp.ndim)
    module, flat, flat_mask = _dispatch(images, flat_mask, fp.ndim, backend)
    return for_caller(module.mean_local_entropy(flat, fp, flat_mask), images).reshape(
        images.shape[: -fp.ndim]
    )
