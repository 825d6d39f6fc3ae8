"""What the study and the comparison share: the classifier under test and its adversarial sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks import AdversarialSet, generate
from frmap.engine.models import Normalized, model_identity, predict


@dataclass(frozen=True)
class Subject:
    """A classifier of [N, C, H, W] images in [0, 1], as the detectors and attacks see it.

    Attributes:
        model: the network as given (its ReLUs take the response rules).
        classifier: `model` behind the ImageNet normalisation when `preprocess == "imagenet"`,
            else `model`: what images in [0, 1] go through.
        identity: `model_identity(model)`.
        preprocess: "imagenet" or None.
    """

    model: nn.Module
    classifier: nn.Module
    identity: str
    preprocess: str | None

    @classmethod
    def of(cls, model: nn.Module, preprocess: str | None) -> Subject:
        """The subject of `model` (put in eval mode) with its preprocessing."""
        model = model.eval()
        classifier = Normalized(model) if preprocess == "imagenet" else model
        return cls(model, classifier, model_identity(model), preprocess)

    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[N] bool: the images the classifier gets right."""
        predicted, _ = predict(self.classifier, images)
        return predicted == labels

    def adversarial_sets(self, attacks: Sequence[str], images: torch.Tensor,
                         labels: torch.Tensor, out_dir: Path, *, seed: int,
                         progress: bool) -> dict[str, AdversarialSet]:
        """One resumable set per attack, under `out_dir/<attack>`."""
        return {name: generate(name, self.classifier, images, labels, out_dir / name, seed=seed,
                               progress=progress)
                for name in tqdm(attacks, desc=out_dir.name, disable=not progress)}
