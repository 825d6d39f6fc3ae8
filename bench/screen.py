"""`frmap bench screen`: what screening adds to the classifier's own forward pass.

For each detector set, a `Screener` scores images (`Screener.scores`: one pass of the
classifier through the entropy detector's reverse walk where the set holds it, every detector
scoring that pass), at batch 1 and at the best batch (VGG19 224: 8, digits: 256), in each
offered precision of the entropy detector. Each screen is reported as a multiple of the
model's own forward pass (no grad) on the same images, measured in the same process with the
variants taking turns (best of the rounds: 50 for one digit, 5 for 256, 3 for VGG19).
Feature squeezing's three squeezers (bit depth, median, non-local means) each cost one more
forward pass by design. One digit is also screened with the walk compiled (`Screener`'s
`compile`, float32; compiled before the timing), the real-time path of a small network.

Detectors: entropy (square3, guided, conv_max), kNN and squeezing built as `frmap calibrate`
builds them (`clean_detectors`); on the digits also Mahalanobis, LID and the two
distance-evolution networks, fitted on noisy copies standing in for adversarials (the fit's
quality does not change the cost). VGG19 has random weights (no downloads here) and kNN
neighbours from random images. Beside each digits set: its mean AUC from the digits
comparison (`comparison-report.json` under `frmap-out/`, written by `frmap demo` or
`frmap evaluate --detectors ...`), where it holds that set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import frmap.bench.machine as machine
from frmap.bench.detectors import fitted_detectors
from frmap.engine.data import load_digits_split
from frmap.engine.detectors import Detector, FeatureSqueezer
from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS, IMAGENET_SQUEEZERS
from frmap.engine.models import Normalized, load_digits_model, load_vgg
from frmap.engine.responses import PRECISIONS
from frmap.engine.screening import Screener
from frmap.engine.screening.build import clean_detectors

COMPARISON = Path("frmap-out") / "comparison-report.json"
DEMO = ("entropy", "knn", "squeeze")


@dataclass(frozen=True)
class Row:
    model: str
    detectors: str
    batch: int
    precision: str
    seconds: float
    ms_per_image: float
    forward_passes: float
    mean_auc: float | None
    compiled: bool = False


def _sets(names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each detector alone, entropy + kNN, the demo's set and (where more) all of them."""
    sets = {n: (n,) for n in names}
    sets["entropy+knn"] = ("entropy", "knn")
    sets["entropy+knn+squeeze"] = DEMO
    if len(names) > len(DEMO):
        sets["+".join(names)] = names
    return sets


def _timed(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each variant's best time over `rounds`, the variants taking turns (after one warm-up)."""
    for fn in variants.values():
        fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _digits(quick: bool) -> tuple[torch.nn.Module, dict[str, Detector], torch.Tensor, str | None]:
    model = load_digits_model()
    train = load_digits_split("train")
    detectors = clean_detectors(DEMO, model, model, train=(train.images, train.labels),
                                footprint="square3", rule="guided", target="conv_max",
                                squeeze=DIGITS_SQUEEZERS)
    if not quick:
        detectors |= fitted_detectors(model)
    return model, detectors, load_digits_split("test").images, None


def _vgg19() -> tuple[torch.nn.Module, dict[str, Detector], torch.Tensor, str | None]:
    model = load_vgg("vgg19", seed=0)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(64, 3, 224, 224, generator=g)  # kNN votes among 50 neighbours
    with torch.no_grad():
        labels = Normalized(model)(train).argmax(1)
    detectors = clean_detectors(DEMO, model, Normalized(model), train=(train, labels),
                                footprint="square3", rule="guided", target="conv_max",
                                squeeze=IMAGENET_SQUEEZERS, batch_size=8)
    return model, detectors, torch.rand(8, 3, 224, 224, generator=g), "imagenet"


def _aucs() -> dict[str, float]:
    """Each set's mean AUC from the digits comparison, where one was written here."""
    if not COMPARISON.is_file():
        return {}
    return json.loads(COMPARISON.read_text()).get("sets", {})


def _rows(name: str, model: torch.nn.Module, detectors: dict[str, Detector],
          images: torch.Tensor, preprocess: str | None, rounds: dict[int, int],
          aucs: dict[str, float], compiled: tuple[int, ...] = ()) -> list[Row]:
    """The rows of one model: `rounds` maps each batch size to its rounds; at the batch sizes
    in `compiled`, the float32 screens with entropy run compiled too."""
    classifier = Normalized(model) if preprocess == "imagenet" else model
    rows = []
    for batch, turns in rounds.items():
        x = images[:batch]
        variants: dict[tuple[str, str, bool], Callable[[], object]] = {}

        def forward(x: torch.Tensor = x) -> object:
            with torch.no_grad():
                return classifier(x)

        variants[("forward", "float32", False)] = forward
        for label, names in _sets(tuple(detectors)).items():
            for precision in (PRECISIONS if "entropy" in names else ("float32",)):
                chosen = {n: detectors[n] for n in names}
                if "entropy" in chosen:
                    chosen["entropy"] = replace(chosen["entropy"], precision=precision)
                ways = (False, True) if batch in compiled and "entropy" in names and \
                    precision == "float32" else (False,)
                for compile in ways:
                    screener = Screener(model, chosen, preprocess=preprocess, batch_size=batch,
                                        compile=compile)
                    variants[(label, precision, compile)] = lambda s=screener, x=x: s.scores(x)
        seconds = _timed(variants, turns)
        base = seconds[("forward", "float32", False)]
        rows += [Row(name, label, batch, precision, t, t / batch * 1e3, t / base,
                     aucs.get(label) if name == "digits" else None, compile)
                 for (label, precision, compile), t in seconds.items()]
    return rows


def run(quick: bool = False) -> dict:
    """The forward pass and each set's screen (see the module docstring); rows and machine."""
    aucs = _aucs()
    model, detectors, images, preprocess = _digits(quick)
    # a digits screen of one image takes milliseconds: its best of 5 rounds is still noise
    rounds = {1: 5, 16: 2} if quick else {1: 50, 256: 5}
    rows = _rows("digits", model, detectors, images, preprocess, rounds, aucs, compiled=(1,))
    if not quick:
        model, detectors, images, preprocess = _vgg19()
        rows += _rows("vgg19-224", model, detectors, images, preprocess, {1: 3, 8: 3}, aucs)
    return {"rows": [asdict(r) for r in rows], "machine": machine.describe(),
            "squeezers": {"digits": list(FeatureSqueezer(DIGITS_SQUEEZERS).squeezers),
                          "vgg19-224": list(FeatureSqueezer(IMAGENET_SQUEEZERS).squeezers)}}


def table(result: dict) -> str:
    """The cost/accuracy table: each screen as a multiple of the forward pass."""
    lines = [f"{'model':10} {'batch':>5} {'detectors':34} {'precision':22} {'ms/image':>9} "
             f"{'x forward':>9} {'mean AUC':>8}"]
    for r in result["rows"]:
        auc = "-" if r["mean_auc"] is None else f"{r['mean_auc']:.3f}"
        how = r["precision"] + (", compiled" if r.get("compiled") else "")
        lines.append(f"{r['model']:10} {r['batch']:5d} {r['detectors']:34} {how:22} "
                     f"{r['ms_per_image']:9.3f} {r['forward_passes']:9.2f} {auc:>8}")
    lines.append("\nsqueeze: one forward pass per squeezer, " + "; ".join(
        f"{m}: {', '.join(names)}" for m, names in result["squeezers"].items()))
    lines.append(machine.summary(result["machine"]))
    return "\n".join(lines)
