"""The detectors' one contract: every detector scores a `ScreenPass`, what one pass of the
classifier over N images gives, through `Detector.score(p)`.

A detector says what it reads with `Detector.needs` (`Needs`: feature layers, entropy scores of
a response rule and target, squeezed copies); `PassRunner` gathers the needs of a set of
detectors and makes one `ScreenPass` per batch:

- with an entropy detector whose reverse walk can hold the feature layers (`ResponseEngine`'s
  `observes`: a float32 forward pass), the walk's forward pass is the classifier's: the
  logits and the layers' features come from it, and the walk goes back from it. The classifier
  runs once;
- otherwise one forward pass (`collect_features`) gives the features and logits, and each
  response engine runs its own walk;
- the squeezed copies of every squeezer go through the classifier together, in calls of the
  batch's size (`MIN_CALL` at least): through that walk's forward pass alone (its faster
  steps) where there is one, else with the originals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from frmap.engine.data.footprints import parse_footprint
from frmap.engine.detectors.features import Features, collect_features
from frmap.engine.responses import ResponseEngine

Squeeze = Callable[[torch.Tensor], torch.Tensor]
# Squeezed copies go through the classifier in calls of max(batch, MIN_CALL) images: a small
# batch's copies in one call (per-call overhead), a large batch's a batch at a time (768 digits
# in one call took 332 ms on the CPU, three calls of 256 took 244 ms).
MIN_CALL = 64


@dataclass(frozen=True)
class EntropyNeed:
    """Entropy scores of the responses of one rule, target and precision, in one window."""

    rule: str
    target: str
    precision: str
    footprint: str


@dataclass(frozen=True)
class Needs:
    """What a detector reads of a pass.

    Attributes:
        layers: feature layers (`collect_features` names).
        entropy: entropy scores it reads.
        squeezers: squeezer key -> the squeezer ([N, C, H, W] in [0, 1] -> the same).
    """

    layers: tuple[str, ...] = ()
    entropy: tuple[EntropyNeed, ...] = ()
    squeezers: dict[str, Squeeze] = field(default_factory=dict)

    @classmethod
    def union(cls, needs: Sequence[Needs]) -> Needs:
        """Everything any of `needs` reads, each once, in order."""
        return cls(tuple(dict.fromkeys(x for n in needs for x in n.layers)),
                   tuple(dict.fromkeys(x for n in needs for x in n.entropy)),
                   {k: v for n in needs for k, v in n.squeezers.items()})


@dataclass(frozen=True)
class ScreenPass:
    """What one pass over N images gives the detectors.

    Attributes:
        features: the logits and the pooled outputs of the needed layers.
        images: `[N, C, H, W]` the images, in [0, 1] (None where only features are known).
        classifier: the model the images went through (for detectors that run it again, as
            Mahalanobis's input pre-processing does; None where only features are known).
        entropy: `EntropyNeed` -> `[N]` float64 entropy scores.
        squeezed: squeezer key -> `[N, K]` float64 softmax of the squeezed copies.
        batch_size: images per pass through the model, for detectors that run it again.
    """

    features: Features
    images: torch.Tensor | None = None
    classifier: nn.Module | None = None
    entropy: dict[EntropyNeed, np.ndarray] = field(default_factory=dict)
    squeezed: dict[str, np.ndarray] = field(default_factory=dict)
    batch_size: int = 64

    def __len__(self) -> int:
        return len(self.features)

    def take(self, index: np.ndarray) -> ScreenPass:
        """The images at `index` (integers or a boolean mask)."""
        images = None if self.images is None else self.images[torch.from_numpy(
            np.asarray(index))]
        return ScreenPass(self.features.take(index), images, self.classifier,
                          {k: v[index] for k, v in self.entropy.items()},
                          {k: v[index] for k, v in self.squeezed.items()}, self.batch_size)

    @classmethod
    def concat(cls, parts: Sequence[ScreenPass]) -> ScreenPass:
        """The images of `parts` one after another (all parts must hold the same keys)."""
        first = parts[0]
        images = None if first.images is None else torch.cat([p.images for p in parts])
        return cls(Features.concat([p.features for p in parts]), images, first.classifier,
                   {k: np.concatenate([p.entropy[k] for p in parts]) for k in first.entropy},
                   {k: np.concatenate([p.squeezed[k] for p in parts]) for k in first.squeezed},
                   first.batch_size)


class PassRunner:
    """Makes the `ScreenPass`es that a set of needs asks for (see the module docstring).

    Args:
        model: the network as given (the response engines' model).
        classifier: `model` behind its preprocessing (what images in [0, 1] go through).
        needs: what the pass must hold (`Needs.union` of the detectors').
        preprocess: "imagenet" or None, as for `ResponseEngine`.
        batch_size: images per pass through the model.
        compile: the response engines' walks compiled (`ResponseEngine`'s `compile`).
    """

    def __init__(self, model: nn.Module, classifier: nn.Module, needs: Needs, *,
                 preprocess: str | None, batch_size: int, compile: bool = False) -> None:
        self.classifier, self.needs, self.batch_size = classifier, needs, batch_size
        self.engines: dict[tuple[str, str, str], ResponseEngine] = {}
        self.footprints: dict[tuple[str, str, str], dict[EntropyNeed, np.ndarray]] = {}
        for need in needs.entropy:
            key = (need.rule, need.target, need.precision)
            if key not in self.engines:
                self.engines[key] = ResponseEngine(
                    model, rule=need.rule, target=need.target, batch_size=batch_size,
                    preprocess=preprocess, precision=need.precision, compile=compile)
                self.footprints[key] = {}
            self.footprints[key][need] = parse_footprint(need.footprint)
        # the engine whose walk's forward pass is the classifier's, where one can be
        self.walker = next((k for k, e in self.engines.items()
                            if e.observes(needs.layers)), None)

    @property
    def one_pass(self) -> bool:
        """Whether the classifier runs once per batch (besides the squeezed copies)."""
        return self.walker is not None or not self.engines

    def run(self, images: torch.Tensor) -> ScreenPass:
        """The pass over `images` ([N, C, H, W] floats in [0, 1]), batch by batch."""
        parts = [self._batch(images[i:i + self.batch_size])
                 for i in range(0, len(images), self.batch_size)]
        return parts[0] if len(parts) == 1 else ScreenPass.concat(parts)

    def _batch(self, x: torch.Tensor) -> ScreenPass:
        n = len(x)
        squeezed = {k: squeeze(x) for k, squeeze in self.needs.squeezers.items()}
        entropy: dict[EntropyNeed, np.ndarray] = {}
        copies = list(squeezed.values())
        if self.walker is not None:
            seen = self.engines[self.walker].observe(x, self.footprints[self.walker],
                                                     self.needs.layers)
            entropy |= {k: v.cpu().numpy() for k, v in seen.scores.items()}
            features = Features({k: v.numpy() for k, v in seen.layers.items()},
                                seen.logits.numpy())
            logits = self.engines[self.walker].logits(
                torch.cat(copies), max(n, MIN_CALL)).numpy() if copies else None
        else:
            everything = collect_features(self.classifier,
                                          torch.cat([x, *copies]) if copies else x,
                                          self.needs.layers, batch_size=max(n, MIN_CALL))
            features = everything.take(np.arange(n))
            logits = everything.logits[n:]
        for key, engine in self.engines.items():
            if key != self.walker:
                entropy |= engine.footprint_scores(x, self.footprints[key])
        probabilities = {} if not copies else {
            k: Features({}, logits[i * n:(i + 1) * n]).probabilities
            for i, k in enumerate(squeezed)}
        return ScreenPass(features, x, self.classifier, entropy, probabilities, self.batch_size)
