"""From float feature-response maps to detection scores: `response_to_image`, `response_score`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._arrays import check_array, dtype_name, footprint_array, for_backend, for_caller, is_tensor
from ._dispatch import implementation

if TYPE_CHECKING:
    from ._arrays import Array

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _validate_responses(responses: Array) -> None:
    check_array(responses, "responses")
    if dtype_name(responses) not in _FLOAT_DTYPES:
        raise TypeError(f"responses must be floating point, got {dtype_name(responses)}")
    if responses.ndim != 4:
        raise ValueError(
            f"responses must have shape [N, C, H, W], got shape {tuple(responses.shape)}"
        )
    n, c, h, w = responses.shape
    if c not in (1, 3):
        raise ValueError(f"responses must have 1 or 3 channels, got {c} (shape [N, C, H, W])")
    if h == 0 or w == 0:
        raise ValueError(f"responses have an empty spatial shape {(h, w)}")
    # one reduction first: a finite sum has finite terms (a sum of finite values that
    # overflows falls through to the element-wise check)
    if is_tensor(responses):
        if bool(responses.sum().isfinite()):
            return
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(responses.sum()):
                return
    finite = responses.isfinite() if is_tensor(responses) else np.isfinite(responses)
    if not finite.all():
        bad_rows = (~finite).reshape(n, -1).any(1)
        bad_images = [i for i in range(n) if bad_rows[i]]
        raise ValueError(
            f"responses hold {int((~finite).sum())} NaN or Inf values (images {bad_images[:10]})"
        )


def _dispatch(responses: Array, backend: str):
    _validate_responses(responses)
    name, module = implementation("response", backend, responses)
    if dtype_name(responses) in ("float16", "bfloat16"):
        responses = responses.float() if is_tensor(responses) else responses.astype(np.float32)
    return module, for_backend(responses, name)


def response_to_image(responses: Array, *, backend: str = "auto") -> Array:
    """Turn response maps into the uint8 grayscale images whose entropy is the score.

    Per image (METHOD step 4): mean and population standard deviation over all channels and
    pixels (float64), `(r - mean) / (std + 1e-5) * 0.1 + 0.5`, clipped to [0, 1], x255,
    truncated to uint8 (signed: a zero response is a flat 127); three channels then become
    gray with the ITU-R 601-2 luma weights exactly as PIL's `Image.convert("L")` rounds them,
    `(19595 R + 38470 G + 7471 B + 2**15) >> 16`; one channel is used as is.

    Args:
        responses: [N, C, H, W] finite floats, C = 1 or 3, numpy or torch.
        backend: "auto", "reference", "cpu" or "triton".

    Returns:
        [N, H, W] uint8, the same kind of array as `responses`.
    """
    module, data = _dispatch(responses, backend)
    return for_caller(module.response_image(data), responses)


def response_score(responses: Array, footprint: Array, *, backend: str = "auto") -> Array:
    """The detection score: mean local entropy (bits) of each response image.

    Equal to `mean_local_entropy(response_to_image(responses), footprint)`; the fast backends
    never materialise the entropy map (the C++ kernel computes the gray levels on the fly, the
    Triton path writes the uint8 image, then reduces it). Higher = more likely adversarial.

    Args:
        responses: [N, C, H, W] finite floats, C = 1 or 3, numpy or torch.
        footprint: [h, w] binary window of the local entropy.
        backend: "auto", "reference", "cpu" or "triton".

    Returns:
        [N] float64 scores, the same kind of array as `responses`.
    """
    fp = footprint_array(footprint)
    module, data = _dispatch(responses, backend)
    return for_caller(module.response_score(data, fp), responses)
