"""The detection study: attack, score, calibrate, evaluate and draw, for one classifier.

`run_study` takes a model and clean calibration / test images in [0, 1], crafts the adversarial
sets from the test images (resumable, under `out_dir/adversarial/<attack>`), scores clean and
adversarial images with the feature-response entropy for every footprint of the study, calibrates
on the calibration split and reports on the test split (METHOD section 4). Everything it writes
lands in `out_dir`, each file atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frmap.engine.attacks import ATTACKS, PAPER_ATTACKS, AdversarialSet, AttackStats, attack_stats
from frmap.engine.data.files import write_json
from frmap.engine.data.footprints import STUDY, parse_footprint
from frmap.engine.detectors import EntropyDetector
from frmap.engine.evaluation.figures import TracePanel, roc_figure, score_histogram, trace_figure
from frmap.engine.evaluation.metrics import (
    MIN_ADVERSARIALS,
    AttackEvaluation,
    evaluate_attack,
    roc,
    write_results,
)
from frmap.engine.evaluation.subject import Subject
from frmap.engine.models import predict
from frmap.engine.responses import EngineConfig, ResponseEngine
from frmap.kernels import local_entropy, response_to_image


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs.

    Attributes:
        attacks: attack names (see `frmap.engine.attacks.ATTACKS`; default: the paper's five).
        footprints: footprint names compared in the footprint study.
        rule, target: the response engine's backward rule and back-propagated target.
        precision: the response engine's precision, "float32" or "bf16".
        preprocess: "imagenet" for torchvision ImageNet models, None for models taking the
            images as they are.
        operating_fpr: the false-positive rate of the saved detector and of precision/recall.
        attack_limit: attack at most this many test images (None: all).
        batch_size: images per pass through the model.
        seed: seeds the attacks.
    """

    attacks: tuple[str, ...] = PAPER_ATTACKS
    footprints: tuple[str, ...] = STUDY
    rule: str = "guided"
    target: str = "conv_max"
    precision: str = "float32"
    preprocess: str | None = None
    operating_fpr: float = 0.05
    attack_limit: int | None = None
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
        for name in self.footprints:
            parse_footprint(name)
        if not self.attacks or not self.footprints:
            raise ValueError("the study needs at least one attack and one footprint")

    @property
    def engine(self) -> EngineConfig:
        """The response engine's settings."""
        return EngineConfig(rule=self.rule, target=self.target, batch_size=self.batch_size,
                            preprocess=self.preprocess, precision=self.precision)


@dataclass(frozen=True)
class StudyReport:
    """What the study measured, and where it wrote it."""

    model: str
    footprint: str
    attacks: list[AttackStats]
    results: list[AttackEvaluation]
    footprint_auc: dict[str, float]
    files: dict[str, str]


# Scores images [N, C, H, W] for every footprint of the study: one [N] array per footprint name.
Scorer = Callable[[torch.Tensor], dict[str, np.ndarray]]


def trace_panels(engine: ResponseEngine, model: nn.Module, clean: torch.Tensor,
                  adversarials: dict[str, torch.Tensor], footprint: np.ndarray) -> list[TracePanel]:
    """Clean image and its adversarials: input, response image, entropy map, prediction."""
    images = torch.cat([clean[None], *[a[None] for a in adversarials.values()]])
    labels = ["clean", *adversarials]
    predicted, probs = predict(model, images)
    gray = response_to_image(engine.responses(images))
    maps = local_entropy(gray, footprint).numpy()
    panels = []
    for i, label in enumerate(labels):
        img = images[i].permute(1, 2, 0).numpy()
        panels.append(TracePanel(
            label=label, image=img[..., 0] if img.shape[-1] == 1 else img,
            response=gray[i].numpy(), entropy=maps[i], predicted=str(int(predicted[i])),
            confidence=float(probs[i, predicted[i]]), score=float(maps[i].mean()),
        ))
    return panels


def run_study(
    model: nn.Module,
    calibration: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out_dir: str | Path,
    config: StudyConfig = StudyConfig(),
    *,
    progress: bool = False,
    scorer: Scorer | None = None,
) -> StudyReport:
    """Run the whole study; see the module docstring.

    Args:
        model: classifier of [N, C, H, W] images in [0, 1] (ImageNet normalisation inside when
            `config.preprocess == "imagenet"`), C = 1 or 3.
        calibration, test: (images [N, C, H, W] in [0, 1], labels [N]) clean splits; only
            correctly classified images take part.
        out_dir: where adversarial sets, results, figures and the detector go.
        config: see `StudyConfig`.
        progress: show progress bars.
        scorer: scores the clean and adversarial images elsewhere (a Ray Data job) with the
            engine and footprints of `config`; default: `ResponseEngine.footprint_scores` here.
    """
    out = Path(out_dir)
    subject = Subject.of(model, config.preprocess)
    classifier, identity = subject.classifier, subject.identity
    engine = ResponseEngine(subject.model, **asdict(config.engine))
    footprints = {name: parse_footprint(name) for name in config.footprints}

    cal_images, cal_labels = calibration
    test_images, test_labels = test
    cal_images = cal_images[subject.correct(cal_images, cal_labels)]
    clean_test = test_images[subject.correct(test_images, test_labels)]
    attack_images = test_images[: config.attack_limit]
    attack_labels = test_labels[: config.attack_limit]

    sets = subject.adversarial_sets(config.attacks, attack_images, attack_labels,
                                    out / "adversarial", seed=config.seed, progress=progress)
    stats = [attack_stats(s) for s in sets.values()]

    score = scorer or (lambda images: engine.footprint_scores(images, footprints))
    calib_scores = score(cal_images)
    clean_scores = score(clean_test)
    adv_scores = {name: score(s.images) for name, s in sets.items() if len(s.images)}
    if not adv_scores:
        raise ValueError("no attack produced a successful adversarial: nothing to evaluate")

    results = [
        evaluate_attack(calib_scores[fp], clean_scores[fp], adv_scores[a][fp],
                        detector=f"entropy-{fp}", attack=a, operating_fpr=config.operating_fpr)
        for fp in footprints for a in adv_scores
    ]
    # The footprint is chosen by the mean AUC over the attacks with enough adversarials to
    # measure (an attack that fooled a handful of images would decide by chance).
    measured = {a for a, s in sets.items() if len(s.images) >= MIN_ADVERSARIALS} or set(adv_scores)
    footprint_auc = {
        fp: float(np.mean([r.auc for r in results
                           if r.detector == f"entropy-{fp}" and r.attack in measured]))
        for fp in footprints
    }
    best = max(footprint_auc, key=footprint_auc.__getitem__)

    detector = EntropyDetector.fit(calib_scores[best], fpr=config.operating_fpr, footprint=best,
                                   rule=config.rule, target=config.target, model=identity,
                                   precision=config.precision)
    files = {"detector": str(detector.save(out / "detector.npz"))}
    write_results(results, out / "results.json", out / "results.csv")
    files |= {"results": str(out / "results.json"), "results_csv": str(out / "results.csv")}
    files["attacks"] = str(write_json(out / "attacks.json", [asdict(s) for s in stats]))
    drawn = [a for a in adv_scores if len(sets[a].images) >= MIN_ADVERSARIALS]
    left_out = [a for a in adv_scores if a not in drawn]
    curves = {}
    for a in drawn:
        fpr, tpr = roc(clean_scores[best], adv_scores[a][best])
        auc = next(r.auc for r in results if r.attack == a and r.detector == f"entropy-{best}")
        curves[a] = (fpr, tpr, auc)
    files["roc"] = str(roc_figure(curves, out / "roc.png", f"feature-response entropy, {best}",
                                  left_out))
    files["histogram"] = str(score_histogram(
        clean_scores[best], {a: adv_scores[a][best] for a in drawn}, out / "histogram.png",
        f"mean local entropy ({best}), bits", left_out))
    traced = _traced_image(sets)
    if traced is not None:
        adversarials = {a: s.images[(s.index == traced).nonzero()[0, 0]]
                        for a, s in sets.items() if (s.index == traced).any()}
        panels = trace_panels(engine, classifier, attack_images[traced], adversarials,
                               footprints[best])
        files["trace"] = str(trace_figure(panels, out / "trace.png"))
    report = StudyReport(identity, best, stats, results, footprint_auc, files)
    write_json(out / "study.json", asdict(report))
    return report


def _traced_image(sets: dict[str, AdversarialSet]) -> int | None:
    """The first attacked image that most attacks turned adversarial."""
    counts: dict[int, int] = {}
    for s in sets.values():
        for i in s.index.tolist():
            counts[i] = counts.get(i, 0) + 1
    return max(counts, key=lambda i: (counts[i], -i)) if counts else None
