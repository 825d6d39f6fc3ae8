"""Batched, gradient-free classification: `predict`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify images in batches.

    Args:
        model: A classifier returning logits `[N, K]`.
        images: Model inputs `[N, ...]`.
        batch_size: Images per forward pass.

    Returns:
        The predicted classes `[N]` (int64) and the softmax probabilities `[N, K]` (float32).
    """
    if len(images) == 0:
        raise ValueError("predict needs at least one image")
    probs = torch.cat(
        [
            model(images[i : i + batch_size]).float().softmax(1)
            for i in range(0, len(images), batch_size)
        ]
    )
    return probs.argmax(1), probs
