"""What the responses back-propagate: the target of each image (METHOD section 1, step 1).

"conv_max": the sum over positions of the channel-wise maximum of the last ReLU after a
convolution (torchvision VGG19: `features[35]`, the paper's); "logit": the top-class logit; or
class indices, one for every image or one per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from frmap.kernels import ReLURule

TARGETS = ("conv_max", "logit")

Target = str | int | Sequence[int] | torch.Tensor


def check_target(target: object) -> None:
    """Raise ValueError unless `target` is one of `TARGETS` or a class index."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; use {', '.join(TARGETS)} or classes")
    elif isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be {', '.join(TARGETS)} or a class index, got {target!r}")


def target_classes(target: Target, n: int) -> torch.Tensor | None:
    """[n] class indices to back-propagate (-1: the top class), or None for conv_max."""
    if isinstance(target, str):
        check_target(target)
        return None if target == "conv_max" else torch.full((n,), -1)
    if isinstance(target, int):
        check_target(target)
        return torch.full((n,), target)
    classes = torch.as_tensor(target)
    if classes.shape != (n,) or classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(f"per-image target must be {n} integer class indices, got "
                         f"{classes.dtype} of shape {tuple(classes.shape)}")
    if (classes < 0).any():
        raise ValueError(f"class indices must be >= 0, got {classes.min().item()}")
    return classes.long()


def conv_max_index(layers: Sequence[nn.Module]) -> int:
    """Index of the last ReLU whose nearest preceding conv or linear layer is a convolution.

    Raises:
        ValueError: no ReLU follows a convolution.
    """
    found, last_weighted = None, None
    for i, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            last_weighted = layer
        elif isinstance(layer, (nn.ReLU, ReLURule)) and isinstance(last_weighted, nn.Conv2d):
            found = i
    if found is None:
        raise ValueError("target 'conv_max' needs an nn.ReLU after a convolution; found none")
    return found


def check_classes(classes: torch.Tensor, outputs: int) -> None:
    """Raise ValueError unless every class index in `classes` lies below `outputs`, the
    model's number of outputs."""
    if bool((classes >= outputs).any()):
        raise ValueError(f"class index {int(classes.max())} is out of range: the model has "
                         f"{outputs} outputs")


def target_indices(out: torch.Tensor, classes: torch.Tensor | None, *,
                   checked: bool = False) -> torch.Tensor:
    """Indices along dim 1 of `out` whose sum the responses back-propagate.

    Args:
        out: the target layer's output: the last ReLU after a conv [N, C, H, W] for conv_max,
            the logits [N, K] otherwise.
        classes: None for conv_max (the channel-wise maximum at each position); else [N]
            class indices, -1 meaning the top class.
        checked: the classes are known to lie in range (`check_classes` run by a caller that
            traces the walk into a graph, where a check on their values cannot run).

    Returns:
        [N, 1, H, W] or [N, 1] int64 indices.

    Raises:
        ValueError: a class index out of range.
    """
    if classes is None:
        return out.max(dim=1, keepdim=True).indices
    if not checked:
        check_classes(classes, out.shape[1])
    return torch.where(classes < 0, out.argmax(1), classes).view(-1, 1)
