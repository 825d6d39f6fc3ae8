"""`frmap bench detectors`: scoring throughput of every detector on the digits.

The detectors are fitted on the digits' train split (the distance-evolution networks for one
epoch, and the Mahalanobis and LID layer combinations, on noisy copies as stand-in
adversarials: the fit's quality does not change the cost), then score the test split. The
forward pass that collects the features and logits is shared by the activation-space
detectors and feature squeezing and timed once, as its own row; each detector's row times only
its own work (the entropy score runs its own forward and backward passes: guided
backpropagation, square3 window), and the last row is the forward pass plus every detector.
Every time is the best of a few repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

import frmap.bench.machine as machine
from frmap.bench.entropy import best_time
from frmap.engine.data import load_digits_split, parse_footprint
from frmap.engine.detectors import (
    Detector,
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    LIDConfig,
    LIDDetector,
    MahalanobisConfig,
    MahalanobisDetector,
    collect_features,
    default_layers,
)
from frmap.engine.detectors.distance_evolution import DistanceEvolutionDetector, EvolutionConfig
from frmap.engine.detectors.examples import CLEAN, Examples, split_by_image
from frmap.engine.detectors.screen_pass import PassRunner, ScreenPass
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
from frmap.engine.models import load_digits_model, model_identity
from frmap.engine.responses import ResponseEngine


@dataclass(frozen=True)
class Row:
    detector: str
    images: int
    seconds: float
    images_per_s: float


def _evolution(model: torch.nn.Module, layers: tuple[str, ...]) -> dict[str, Examples]:
    """Train-split examples: clean versions and uniformly noised copies as the "attack"."""
    train = load_digits_split("train")
    noise = torch.rand(train.images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (train.images + 0.2 * noise - 0.1).clamp(0, 1)
    ids = np.arange(len(train.labels))
    examples = Examples.concat([
        Examples.of(collect_features(model, train.images, layers), CLEAN, ids),
        Examples.of(collect_features(model, noisy, layers), "noise", ids),
    ])
    fit, validation = split_by_image(examples, 0.2)
    return {"fit": fit, "validation": validation}


def fitted_detectors(model: torch.nn.Module) -> dict[str, Detector]:
    """Mahalanobis, LID and the distance-evolution networks fitted for the digits `model` on
    the train split, with noisy copies as stand-in adversarials (`_evolution`)."""
    layers = default_layers(model)
    train = load_digits_split("train")
    reference = collect_features(model, train.images, layers)
    labels, identity = train.labels.numpy(), model_identity(model)
    split = _evolution(model, layers)
    return {
        "mahalanobis": MahalanobisDetector.fit(reference, labels, split["fit"],
                                               MahalanobisConfig(layers), model=identity),
        "lid": LIDDetector.fit(split["fit"], LIDConfig(layers), model=identity),
        **{f"distance-{net}": DistanceEvolutionDetector.fit(
            reference, labels, split["fit"], split["validation"],
            EvolutionConfig(layers, network=net, epochs=1), model=identity)
           for net in ("lstm", "mlp")},
    }


def run(quick: bool = False) -> dict:
    """Fit every detector on the digits, time scoring the test split; return rows and machine."""
    model = load_digits_model()
    layers = default_layers(model)
    train, images = load_digits_split("train"), load_digits_split("test").images
    reference = collect_features(model, train.images, layers)
    knn = KNNDetector.fit(reference, train.labels.numpy(),
                          KNNConfig(layers[-1], components=64, k=50))
    fitted = fitted_detectors(model)
    mahalanobis, lid = fitted["mahalanobis"], fitted["lid"]
    networks = {k: v for k, v in fitted.items() if k.startswith("distance-")}
    squeeze = FeatureSqueezer(DIGITS_SQUEEZERS)
    entropy = ResponseEngine(model, preprocess=None, batch_size=128)
    square3 = parse_footprint("square3")
    features = ScreenPass(collect_features(model, images, layers))
    squeezed = PassRunner(model, model, squeeze.needs, preprocess=None, batch_size=len(images))
    repeats = 2 if quick else 5
    timed: dict[str, Callable[[], object]] = {
        "forward (shared)": lambda: collect_features(model, images, layers),
        **{name: (lambda d=d: d.score(features))
           for name, d in {"knn": knn, "mahalanobis": mahalanobis, "lid": lid,
                           **networks}.items()},
        "squeeze": lambda: squeeze.score(squeezed.run(images)),
        "entropy": lambda: entropy.scores(images, square3),
    }
    seconds = {name: best_time(fn, repeats) for name, fn in timed.items()}
    seconds["all (forward once)"] = sum(seconds.values())
    n = len(images)
    rows = [Row(name, n, t, n / t) for name, t in seconds.items()]
    return {"rows": [asdict(r) for r in rows], "machine": machine.describe()}


def table(result: dict) -> str:
    """A readable table of the rows."""
    lines = [f"{'detector':20} {'images':>6} {'ms':>10} {'images/s':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['detector']:20} {r['images']:6d} {r['seconds'] * 1e3:10.2f} "
                     f"{r['images_per_s']:10.0f}")
    lines.append("\n" + machine.summary(result["machine"]))
    return "\n".join(lines)
