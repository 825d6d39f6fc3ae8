"""Screening images with any set of detectors: `Screener` and its file format.

A screener holds a classifier, fitted detectors (entropy, kNN, distance evolution, squeezing)
and a decision:

- "combined": the detectors' scores go through a `Combiner` (a logistic regression fitted on
  clean and adversarial images by `frmap evaluate --save-screener`), whose decision value is
  flagged above one threshold calibrated on clean images at the operating FPR;
- "any": an image is flagged when any detector flags it, each detector calibrated on clean
  images at its share of the FPR, fpr / k for k detectors (`frmap calibrate --detectors`: no
  adversarial images are needed).

`screen(images)` makes one `ScreenPass` per batch (`PassRunner`): the classifier runs once,
through the entropy detector's reverse walk where there is one, and every detector scores
that pass.

File format `frmap.screener/1`: an `.npz` archive (read with `allow_pickle=False`) whose key
`meta` holds one JSON document,

    {"format": "frmap.screener/1", "versions": {...}, "model": "<ClassName>:<sha256 prefix>",
     "preprocess": "imagenet" | null, "decision": "combined" | "any", "fpr": 0.05,
     "threshold": null | {"value", "fpr", "achieved_fpr", "n_clean"},
     "detectors": {"<name>": <the detector's document, as in frmap.detector/2>, ...},
     "combiner": null | {"names": [...], "intercept": float}}

and whose other keys are the detectors' arrays (`detector:<name>:<array>`) and the combiner's
(`combiner:<array>`). A detector file (`frmap.detector/2`, or an entropy detector JSON of frmap
0.1) loads as a one-detector screener.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frmap.engine.detectors import Detector, Features, Threshold, load_detector
from frmap.engine.detectors.archive import read_archive, versions, write_archive
from frmap.engine.detectors.base import from_parts
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.screen_pass import Needs, PassRunner
from frmap.engine.models import Normalized, model_identity, one_blas_thread
from frmap.engine.screening.combiner import Combiner

FORMAT = "frmap.screener/1"
DECISIONS = ("combined", "any")


@dataclass(frozen=True)
class ScreenResult:
    """What a screener says of N images.

    Attributes:
        predicted: `[N]` int64, the classifier's class; confidence: `[N]` its probability.
        scores: detector name -> `[N]` float64 score (higher = more adversarial).
        combined: `[N]` the combination's decision value (None without a combination).
        flagged: `[N]` bool, True = adversarial by the screener's decision.
    """

    predicted: np.ndarray
    confidence: np.ndarray
    scores: dict[str, np.ndarray]
    combined: np.ndarray | None
    flagged: np.ndarray

    def __len__(self) -> int:
        return len(self.predicted)

    def record(self, i: int) -> dict:
        """Image `i` as a JSON-ready dict (the keys of `frmap score` and `frmap serve`)."""
        return {"prediction": int(self.predicted[i]),
                "confidence": round(float(self.confidence[i]), 6),
                "scores": {k: float(v[i]) for k, v in self.scores.items()},
                "combined": None if self.combined is None else float(self.combined[i]),
                "flagged": bool(self.flagged[i])}

    @classmethod
    def concat(cls, parts: list[ScreenResult]) -> ScreenResult:
        """The images of `parts` one after another."""
        first = parts[0]
        return cls(np.concatenate([p.predicted for p in parts]),
                   np.concatenate([p.confidence for p in parts]),
                   {k: np.concatenate([p.scores[k] for p in parts]) for k in first.scores},
                   None if first.combined is None else np.concatenate([p.combined for p in parts]),
                   np.concatenate([p.flagged for p in parts]))


class Screener:
    """A classifier, fitted detectors and one decision rule (see the module docstring).

    Args:
        model: the CNN, taking [N, C, H, W] images in [0, 1] (behind the ImageNet normalisation
            when `preprocess == "imagenet"`); it stays on its device.
        detectors: name -> fitted detector, each fit for `model`.
        preprocess: "imagenet" or None, as for `ResponseEngine`.
        combiner: the score combination (decision "combined"), or None (decision "any").
        threshold: the combination's calibrated threshold (None until `calibrate`).
        fpr: the operating false-positive rate the thresholds were calibrated for.
        batch_size: images per pass through the model.
        compile: the entropy detectors' walks compiled (`ResponseEngine`'s `compile`): each
            batch shape compiles on its first screen (seconds), then screens small batches
            faster (the real-time path).

    Raises:
        ValueError: no detector, a detector fit for another model, or a combiner over other
            detectors.
    """

    def __init__(self, model: nn.Module, detectors: dict[str, Detector], *,
                 preprocess: str | None = None, combiner: Combiner | None = None,
                 threshold: Threshold | None = None, fpr: float | None = None,
                 batch_size: int = 64, compile: bool = False) -> None:
        if not detectors:
            raise ValueError("a screener needs at least one detector")
        if combiner is not None and set(combiner.names) != set(detectors):
            raise ValueError(f"the combiner combines {list(combiner.names)}, the screener holds "
                             f"{list(detectors)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.eval()
        self.identity = model_identity(model)
        for name, detector in detectors.items():
            if detector.model != self.identity:
                raise ValueError(f"detector {name!r} was fit for model {detector.model}, not "
                                 f"for {self.identity}")
        self.detectors = dict(detectors)
        self.preprocess = preprocess
        self.combiner, self.threshold, self.fpr = combiner, threshold, fpr
        self.batch_size, self.compile = batch_size, compile
        self.classifier = Normalized(model) if preprocess == "imagenet" else model
        self.runner = PassRunner(model, self.classifier,
                                 Needs.union([d.needs for d in detectors.values()]),
                                 preprocess=preprocess, batch_size=batch_size, compile=compile)

    @property
    def decision(self) -> str:
        """"combined" or "any"."""
        return "any" if self.combiner is None else "combined"

    @property
    def calibrated(self) -> bool:
        if self.combiner is not None:
            return self.threshold is not None
        return all(d.threshold is not None for d in self.detectors.values())

    def scores(self, images: torch.Tensor | np.ndarray) -> tuple[Features, dict[str, np.ndarray]]:
        """The forward pass's logits and every detector's `[N]` scores of `images` (the
        detectors' numpy products on one BLAS thread: `one_blas_thread`)."""
        p = self.runner.run(self._images(images))
        with one_blas_thread():
            return p.features, {name: d.score(p) for name, d in self.detectors.items()}

    def screen(self, images: torch.Tensor | np.ndarray) -> ScreenResult:
        """Classify and screen `images` ([N, C, H, W] floats in [0, 1]), in input order.

        Raises:
            ValueError: bad images, or a screener that is not calibrated.
        """
        if not self.calibrated:
            raise ValueError("the screener has no thresholds yet; calibrate it first")
        features, scores = self.scores(images)
        probabilities = features.probabilities
        predicted = probabilities.argmax(1)
        confidence = probabilities[np.arange(len(predicted)), predicted]
        if self.combiner is None:
            combined = None
            flagged = np.any([d.flag(scores[n]) for n, d in self.detectors.items()], axis=0)
        else:
            combined = self.combiner(scores)
            flagged = combined > self.threshold.value
        return ScreenResult(predicted, confidence, scores, combined, flagged)

    def records(self, images: torch.Tensor | np.ndarray) -> list[dict]:
        """`screen(images)` as one JSON-ready dict per image (`ScreenResult.record`); an
        uncalibrated screener gives the scores with `combined` and `flagged` None."""
        if self.calibrated:
            result = self.screen(images)
            return [result.record(i) for i in range(len(result))]
        features, scores = self.scores(images)
        return [{"prediction": int(p.argmax()), "confidence": round(float(p.max()), 6),
                 "scores": {k: float(v[i]) for k, v in scores.items()}, "combined": None,
                 "flagged": None} for i, p in enumerate(features.probabilities)]

    def calibrate(self, clean_images: torch.Tensor | np.ndarray, fpr: float) -> Screener:
        """A copy calibrated on clean images to the false-positive rate `fpr`.

        Each detector is calibrated at its share, fpr / k for k detectors (so that "any" flags
        at most about `fpr` of clean images), and the combination, where there is one, at `fpr`.
        """
        return self.calibrate_scores(self.scores(clean_images)[1], fpr)

    def calibrate_scores(self, clean_scores: dict[str, np.ndarray], fpr: float) -> Screener:
        """`calibrate` from the detectors' scores of clean images (as `scores` gives them)."""
        if not 0 < fpr < 1:
            raise ValueError(f"the false-positive rate must lie in (0, 1), got {fpr}")
        share = fpr / len(self.detectors)
        detectors = {n: d.calibrate(clean_scores[n], share) for n, d in self.detectors.items()}
        threshold = None if self.combiner is None else Threshold.fit(
            self.combiner(clean_scores), fpr)
        return self._with(detectors=detectors, threshold=threshold, fpr=fpr)

    def save(self, path: str | Path) -> Path:
        """Write the screener to `path` in the `frmap.screener/1` format (atomically)."""
        meta = {"format": FORMAT, "versions": versions(), "model": self.identity,
                "preprocess": self.preprocess, "decision": self.decision, "fpr": self.fpr,
                "threshold": None if self.threshold is None else asdict(self.threshold),
                "detectors": {}, "combiner": None}
        arrays = {}
        for name, detector in self.detectors.items():
            meta["detectors"][name], own = detector.parts()
            arrays |= {f"detector:{name}:{k}": v for k, v in own.items()}
        if self.combiner is not None:
            meta["combiner"], own = self.combiner.parts()
            arrays |= {f"combiner:{k}": v for k, v in own.items()}
        return write_archive(path, meta, arrays)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, preprocess: str | None = None,
             batch_size: int = 64, compile: bool = False) -> Screener:
        """Read a screener file (or a detector file, as a one-detector screener) for `model`.

        `preprocess` applies to a detector file only (a screener file records its own);
        `batch_size` and `compile` as for `Screener`.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: not a screener or detector file, a malformed one, or one fit for
                another model (the error names the file).
        """
        path = Path(path)
        try:
            meta, arrays = read_archive(path, FORMAT)
        except ValueError:
            try:
                detector = load_detector(path)
            except ValueError as err:
                reason = str(err).removeprefix(f"{path}: ")
                raise ValueError(f"{path}: neither a screener nor a detector file ({reason})"
                                 ) from None
            return cls._of_detector(detector, path, model, preprocess, batch_size, compile)
        try:
            return cls._from_parts(meta, arrays, path, model, batch_size, compile)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: malformed screener ({err!r})") from None

    @classmethod
    def _from_parts(cls, meta: dict, arrays: dict[str, np.ndarray], path: Path,
                    model: nn.Module, batch_size: int, compile: bool) -> Screener:
        _check_model(meta["model"], model, path)
        try:
            f = FileFields(meta)
            decision = f.text("decision", DECISIONS)
            preprocess = None if f.is_null("preprocess") else f.text("preprocess", ("imagenet",))
            fpr = None if f.is_null("fpr") else f.number("fpr", 0.0, 1.0)
            if fpr in (0.0, 1.0):
                f.fail("fpr", f"must lie in (0, 1), got {fpr}")
            threshold = f.threshold()
            if not isinstance(f.value("detectors"), dict) or not meta["detectors"]:
                f.fail("detectors", "must name at least one detector")
            detectors = {}
            for name, doc in meta["detectors"].items():
                own = {k.split(":", 2)[2]: v for k, v in arrays.items()
                       if k.startswith(f"detector:{name}:")}
                detectors[name] = from_parts(doc, own, f"detector {name!r}")
            combiner = None
            if decision == "combined":
                if f.is_null("combiner"):
                    f.fail("combiner", "is needed by decision 'combined'")
                own = {k.removeprefix("combiner:"): v for k, v in arrays.items()
                       if k.startswith("combiner:")}
                try:
                    combiner = Combiner.from_parts(meta["combiner"], own)
                except (KeyError, ValueError) as err:
                    f.fail("combiner", f"is malformed: {err}")
            return cls(model, detectors, preprocess=preprocess, combiner=combiner,
                       threshold=threshold, fpr=fpr, batch_size=batch_size, compile=compile)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def _of_detector(cls, detector: Detector, path: Path, model: nn.Module,
                     preprocess: str | None, batch_size: int, compile: bool) -> Screener:
        _check_model(detector.model, model, path)
        fpr = None if detector.threshold is None else detector.threshold.fpr
        return cls(model, {detector.kind: detector}, preprocess=preprocess, fpr=fpr,
                   batch_size=batch_size, compile=compile)

    def _with(self, **changes: object) -> Screener:
        args = {"detectors": self.detectors, "preprocess": self.preprocess,
                "combiner": self.combiner, "threshold": self.threshold, "fpr": self.fpr,
                "batch_size": self.batch_size, "compile": self.compile, **changes}
        return Screener(self.model, **args)

    def _images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch tensor or numpy array, got "
                            f"{type(images).__name__}")
        if not x.is_floating_point() or x.dim() != 4 or len(x) == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] float batch in [0, 1], "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
        return x


def _check_model(identity: object, model: nn.Module, path: Path) -> None:
    own = model_identity(model)
    if identity != own:
        raise ValueError(f"{path}: made for model {identity}, not for {own} (pass the model "
                         "and weights it was made with)")

