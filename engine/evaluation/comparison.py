"""Every detector on the same adversarial sets, in one table (METHOD sections 2 to 4).

`compare_detectors` takes a classifier and clean train / calibration / test splits in [0, 1]:

1. It crafts the adversarial sets of the test images under `out_dir/adversarial/<attack>` (the
   very sets `run_study` makes, so each run reuses the other's) and of a subset of the train
   images under `out_dir/adversarial-train/<attack>`, both resumable.
2. It divides the attacked train images, by image, into disjoint parts: "combiner" images only
   train the score combination, "validation" images only choose the distance-evolution
   networks' epoch, and the other correctly classified train images are the "fit" images the
   detectors learn from (kNN index, class references, the networks' training examples).
3. One forward pass per image set gives the layer features and logits the detectors are fit
   on; the sets they score (combiner, calibration, test) then get the screen's own pass
   (`PassRunner`: the entropy detector's reverse walk gives the features, the squeezed copies
   go through the classifier together), and every detector scores it through
   `Detector.score`, as a screener does.
4. Every detector scores clean calibration, clean test and adversarial test images, higher =
   more adversarial; thresholds come from the calibration split and metrics from the test
   split (`evaluate_attack`), images no detector was trained on.
5. "combined" is a logistic regression over the detectors' standardised scores, fitted on the
   clean and adversarial versions of the combiner images.
6. With `adaptive` set, an attacker who knows the detector (`adaptive`) crafts, from the test
   images, one set against each detector with a differentiable surrogate ("adaptive-<name>";
   the entropy detector's with the guided rule and the conv_max target only),
   one against all of them at once ("adaptive-all"), and the same PGD without a detector term
   ("pgd-fixed", the non-adaptive baseline at the same epsilon); every detector is scored on
   every set.
7. kNN, Mahalanobis and LID also run on each feature layer alone ("knn:<layer>", ...), and
   each distance-evolution network is also trained without one attack and tested on it
   ("<network> unseen").

A row with fewer than `MIN_ADVERSARIALS` adversarials is kept in the results but not measured:
the table shows it as "too few to measure", no mean counts it and the ROC figures leave it out.

Everything it writes lands in `out_dir`, each file atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frmap.engine.attacks import ATTACKS, AdversarialSet, AttackStats, attack_stats
from frmap.engine.data.files import write_json
from frmap.engine.data.footprints import parse_footprint
from frmap.engine.detectors import (
    Detector,
    DistanceEvolutionDetector,
    EntropyDetector,
    EvolutionConfig,
    EvolutionTrainReport,
    Features,
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    LIDConfig,
    LIDDetector,
    MahalanobisConfig,
    MahalanobisDetector,
    SqueezeConfig,
    default_layers,
)
from frmap.engine.detectors.examples import CLEAN, Examples
from frmap.engine.detectors.screen_pass import Needs, PassRunner, ScreenPass
from frmap.engine.detectors.squeeze import IMAGENET_SQUEEZERS
from frmap.engine.evaluation.adaptive import (
    ENTROPY_SURROGATE,
    AdaptiveConfig,
    Surrogate,
    adaptive_pgd,
    entropy_surrogate,
    knn_surrogate,
    lid_surrogate,
    mahalanobis_surrogate,
    squeeze_surrogate,
    standardised,
    summed,
)
from frmap.engine.evaluation.costs import (
    cheapest_within,
    detector_costs,
    detector_sets,
    mean_of,
    set_cost,
)
from frmap.engine.evaluation.figures import roc_figure
from frmap.engine.evaluation.metrics import (
    TOO_FEW,
    AttackEvaluation,
    evaluate_attack,
    roc,
    write_results,
)
from frmap.engine.evaluation.subject import Subject
from frmap.engine.models import torch_settings
from frmap.engine.screening import Combiner, Screener

DETECTORS = ("entropy", "knn", "mahalanobis", "lid", "distance-lstm", "distance-mlp", "squeeze")
COMBINED = "combined"
_NETWORKS = {"distance-lstm": "lstm", "distance-mlp": "mlp"}
_DR_KEY = "5%"  # `AttackEvaluation.detection_rate` key of the FPR-5% detection rate


@dataclass(frozen=True)
class ComparisonConfig:
    """What the comparison runs.

    Attributes:
        detectors: names from `DETECTORS`; the "combined" row is always added.
        attacks: attack names (see `frmap.engine.attacks.ATTACKS`).
        footprint, rule, target: the entropy detector's window, backward rule and target.
        precision: the entropy detector's response precision, "float32" or "bf16".
        preprocess: "imagenet" for torchvision ImageNet models, None for models taking the
            images as they are.
        layers: feature layers (None: `default_layers`); kNN, Mahalanobis and LID run on
            each of them alone.
        knn: the kNN score of the "knn" row (None: `KNNConfig` defaults on the last layer).
        mahalanobis, lid: their settings (None: the defaults on `layers`).
        evolution: the distance-evolution settings (None: `EvolutionConfig` defaults on
            `layers`); the network comes from the detector's name.
        squeeze: the feature squeezers.
        adaptive: the adaptive attack (None: none).
        operating_fpr: the false-positive rate of precision and recall.
        attack_limit: attack at most this many test images (None: all).
        train_limit: attack at most this many train images (None: all).
        combiner_fraction, validation_fraction: shares of the attacked train images kept for
            the combination and for the networks' epoch choice.
        batch_size: images per pass through the model.
        seed: seeds the attacks and the division of the train images.
        max_cost: the saved screener's budget: the best set among those whose screen costs at
            most this many forward passes of the classifier (None: any cost).
    """

    detectors: tuple[str, ...] = DETECTORS
    attacks: tuple[str, ...] = tuple(ATTACKS)
    footprint: str = "square3"
    rule: str = "guided"
    target: str = "conv_max"
    precision: str = "float32"
    preprocess: str | None = None
    layers: tuple[str, ...] | None = None
    knn: KNNConfig | None = None
    mahalanobis: MahalanobisConfig | None = None
    lid: LIDConfig | None = None
    evolution: EvolutionConfig | None = None
    squeeze: SqueezeConfig = IMAGENET_SQUEEZERS
    adaptive: AdaptiveConfig | None = None
    operating_fpr: float = 0.05
    attack_limit: int | None = None
    train_limit: int | None = None
    combiner_fraction: float = 0.3
    validation_fraction: float = 0.2
    batch_size: int = 64
    seed: int = 0
    max_cost: float | None = None

    def __post_init__(self) -> None:
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ValueError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
        parse_footprint(self.footprint)
        if not (0 < self.combiner_fraction and 0 < self.validation_fraction
                and self.combiner_fraction + self.validation_fraction < 1):
            raise ValueError("the combiner and validation fractions must be > 0, sum below 1")
        if self.max_cost is not None and not self.max_cost >= 1:
            raise ValueError(f"max_cost is in forward passes and at least 1 (the classifier's "
                             f"own), got {self.max_cost}")


@dataclass(frozen=True)
class ComparisonReport:
    """What the comparison measured, and where it wrote it.

    Attributes:
        model: the `model_identity` of the classifier.
        attacks, train_attacks: the statistics of the test and the train adversarial sets.
        results: one row per detector (and "combined") and attack.
        per_layer: kNN, Mahalanobis and LID on each feature layer alone ("knn:<layer>", ...).
        best_layer: for each of those detectors, the layer whose rows have the best mean AUC
            over the measured attacks.
        unseen: each distance-evolution network trained without the row's attack.
        combiner: the logistic regression's weight of each detector's standardised score.
        training: the networks' training reports, by detector name (those trained without
            attack A as "<network> unseen:A").
        images: role ("fit", "validation", "combiner" in the train split; "calibration";
            "test") -> the indices of the images of that role in their split.
        files: what was written, by kind.
        screener: the detectors of the saved screener ("combined" first where it combines
            them), empty where none was saved.
        costs: each detector's screen, and "combined" (all of them), in forward passes of the
            classifier on `batch_size` calibration images (`frmap.engine.evaluation.costs`).
        screener_cost: the saved screener's cost in forward passes (None: none saved).
        sets: every detector set ("entropy+knn", ...: one detector alone, or a logistic
            regression over several) -> its mean AUC over the measured attacks.
    """

    model: str
    attacks: list[AttackStats]
    train_attacks: list[AttackStats]
    results: list[AttackEvaluation]
    per_layer: list[AttackEvaluation]
    best_layer: dict[str, str]
    unseen: list[AttackEvaluation]
    combiner: dict[str, float]
    training: dict[str, EvolutionTrainReport]
    images: dict[str, list[int]]
    files: dict[str, str]
    screener: tuple[str, ...] = ()
    costs: dict[str, float] = field(default_factory=dict)
    screener_cost: float | None = None
    sets: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """Versions made one way (clean, or by one attack) of some images of one split.

    Attributes:
        attack: "clean" or the attack's name.
        screen: the pass over the versions: their images, layer features and logits, and, once
            `ComparisonData.screened`, everything the detectors score.
        image: `[N]` the index of each version's source image in its split.
    """

    attack: str
    screen: ScreenPass
    image: np.ndarray

    @property
    def images(self) -> torch.Tensor:
        """`[N, C, H, W]` the versions."""
        return self.screen.images

    @property
    def features(self) -> Features:
        return self.screen.features

    def take(self, mask: np.ndarray) -> Part:
        return Part(self.attack, self.screen.take(mask), self.image[mask])


Scorer = Callable[[ScreenPass], np.ndarray]
DetectorSet = tuple[str, ...]


@dataclass(frozen=True)
class ComparisonData:
    """Every image set of a comparison, by role; no source image has two roles.

    Attributes:
        fit: the clean fit images first, then their adversarial versions: what the detectors
            learn from.
        validation: the networks' epoch choice; combiner: the score combination's fit.
        evaluated: "calibration" (clean), "clean" (test) and one entry per attack (test).
        labels: `[len(fit[0].image)]` the classes of the clean fit images.
        ids: train image indices by role ("fit", "validation", "combiner").
        attack_stats, train_attack_stats: the statistics of the test and train sets.
    """

    fit: list[Part]
    validation: list[Part]
    combiner: list[Part]
    evaluated: dict[str, Part]
    labels: np.ndarray
    ids: dict[str, np.ndarray]
    attack_stats: list[AttackStats]
    train_attack_stats: list[AttackStats]

    @property
    def attacks(self) -> list[str]:
        """The attacks with adversarial test images."""
        return [k for k in self.evaluated if k not in ("calibration", "clean")]

    def scores(self, scorer: Scorer) -> dict[str, np.ndarray]:
        """The scorer on every evaluated set's pass."""
        return {key: scorer(p.screen) for key, p in self.evaluated.items()}

    def screened(self, runner: PassRunner) -> ComparisonData:
        """The data with the evaluated and combiner parts' passes made by `runner` (what the
        detectors score; the fit and validation parts keep their features)."""
        def run(p: Part) -> Part:
            return replace(p, screen=runner.run(p.images))
        return replace(self, combiner=[run(p) for p in self.combiner],
                       evaluated={k: run(p) for k, p in self.evaluated.items()})


def _select(parts: Sequence[Part], ids: np.ndarray) -> list[Part]:
    """The versions of the source images `ids`, without empty parts."""
    chosen = [p.take(np.isin(p.image, ids)) for p in parts]
    return [p for p in chosen if len(p.image)]


def _examples(parts: Sequence[Part]) -> Examples:
    return Examples.concat([Examples.of(p.features, p.attack, p.image) for p in parts])


def _divide(attacked: np.ndarray, correct: np.ndarray, config: ComparisonConfig
            ) -> dict[str, np.ndarray]:
    """Train image indices by role: combiner and validation images drawn from the attacked
    ones, fit images all other correctly classified ones."""
    order = np.random.default_rng(config.seed).permutation(attacked)
    n_comb = round(config.combiner_fraction * len(order))
    n_val = round(config.validation_fraction * len(order))
    if min(n_comb, n_val, len(order) - n_comb - n_val) < 1:
        raise ValueError(f"{len(order)} attacked train images are too few to divide into fit,"
                         " validation and combiner images")
    combiner, validation = np.sort(order[:n_comb]), np.sort(order[n_comb:n_comb + n_val])
    fit = np.setdiff1d(correct, np.r_[combiner, validation])
    return {"fit": fit, "validation": validation, "combiner": combiner}


class _Featurizer:
    """Image sets with their layer features, from one forward pass each."""

    def __init__(self, subject: Subject, layers: tuple[str, ...], batch_size: int) -> None:
        self.runner = PassRunner(subject.model, subject.classifier, Needs(layers=layers),
                                 preprocess=subject.preprocess, batch_size=batch_size)

    def part(self, attack: str, images: torch.Tensor, image: np.ndarray) -> Part:
        return Part(attack, self.runner.run(images), image)

    def clean(self, split: tuple[torch.Tensor, torch.Tensor]) -> Part:
        """The correctly classified images of a split."""
        images, labels = split
        everything = self.part(CLEAN, images, np.arange(len(images)))
        return everything.take(everything.features.predictions == labels.numpy())

    def adversarial(self, sets: dict[str, AdversarialSet]) -> list[Part]:
        return [self.part(s.attack, s.images, s.index.numpy()) for s in sets.values()
                if len(s.index)]


def prepare(subject: Subject, train: tuple[torch.Tensor, torch.Tensor],
            calibration: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor], out: Path, config: ComparisonConfig,
            layers: tuple[str, ...], *, progress: bool) -> ComparisonData:
    """Craft the adversarial sets, take the features, and divide the images by role.

    Raises:
        ValueError: no successful adversarial, or too few attacked train images to divide.
    """
    featurizer = _Featurizer(subject, layers, config.batch_size)
    train_clean, cal, test_clean = (featurizer.clean(s) for s in (train, calibration, test))
    train_sets, test_sets = (
        subject.adversarial_sets(config.attacks, split[0][:limit], split[1][:limit],
                                 out / folder, seed=config.seed, progress=progress)
        for split, limit, folder in ((train, config.train_limit, "adversarial-train"),
                                     (test, config.attack_limit, "adversarial")))
    train_adv, test_adv = featurizer.adversarial(train_sets), featurizer.adversarial(test_sets)
    if not test_adv or not train_adv:
        raise ValueError("no attack produced a successful adversarial: nothing to compare")
    n_attacked = len(train[0][:config.train_limit])
    ids = _divide(train_clean.image[train_clean.image < n_attacked], train_clean.image, config)
    fit, validation, combiner = (_select([train_clean, *train_adv], ids[role])
                                 for role in ("fit", "validation", "combiner"))
    return ComparisonData(
        fit=fit, validation=validation, combiner=combiner,
        evaluated={"calibration": cal, "clean": test_clean, **{p.attack: p for p in test_adv}},
        labels=train[1].numpy()[fit[0].image], ids=ids,
        attack_stats=[attack_stats(s) for s in test_sets.values()],
        train_attack_stats=[attack_stats(s) for s in train_sets.values()],
    )


def train_network(data: ComparisonData, config: EvolutionConfig, identity: str, progress: bool,
                  *, without: str | None = None) -> DistanceEvolutionDetector:
    """A distance-evolution detector trained on the fit images (less one attack's)."""
    # one thread: the networks are too small to gain from more (they lose a lot on a busy
    # machine), and their weights then do not depend on the machine's thread count
    with torch_settings(1):
        return DistanceEvolutionDetector.fit(
            data.fit[0].features, data.labels,
            _examples([p for p in data.fit if p.attack != without]),
            _examples([p for p in data.validation if p.attack != without]),
            config, model=identity, progress=progress)


def _detector(name: str, subject: Subject, data: ComparisonData, config: ComparisonConfig,
              knn: KNNConfig, evolution: EvolutionConfig, training: dict, progress: bool
              ) -> Detector:
    """The detector `name`, fitted on the fit images (uncalibrated)."""
    if name == "entropy":
        return EntropyDetector(config.footprint, config.rule, config.target, subject.identity,
                               precision=config.precision)
    if name == "squeeze":
        return FeatureSqueezer(config.squeeze, subject.identity)
    if name == "knn":
        return KNNDetector.fit(data.fit[0].features, data.labels, knn, model=subject.identity)
    if name == "lid":
        return LIDDetector.fit(_examples(data.fit), config.lid, model=subject.identity)
    if name == "mahalanobis":
        detector = MahalanobisDetector.fit(data.fit[0].features, data.labels,
                                           _examples(data.fit), config.mahalanobis,
                                           model=subject.identity)
        if config.mahalanobis.noise == 0:
            return detector
        return detector.with_combination(_examples(
            [replace(p, screen=replace(p.screen, features=detector.scored_features(p.screen)))
             for p in data.fit]))
    detector = train_network(data, replace(evolution, network=_NETWORKS[name]),
                             subject.identity, progress)
    training[name] = detector.report
    return detector


def _surrogates(detectors: dict[str, Detector], subject: Subject) -> dict[str, Surrogate]:
    """The differentiable surrogates of the detectors that have one (`adaptive`)."""
    makers = {KNNDetector: knn_surrogate, MahalanobisDetector: mahalanobis_surrogate,
              LIDDetector: lid_surrogate, FeatureSqueezer: squeeze_surrogate,
              EntropyDetector: entropy_surrogate}
    return {name: makers[type(d)](subject.classifier, d) for name, d in detectors.items()
            if type(d) in makers and not (isinstance(d, EntropyDetector)
                                          and (d.rule, d.target) != ENTROPY_SURROGATE)}


def _with_adaptive(data: ComparisonData, subject: Subject, labels: torch.Tensor,
                   surrogates: dict[str, Surrogate], config: ComparisonConfig,
                   layers: tuple[str, ...]) -> ComparisonData:
    """`data` with the adaptive sets among the evaluated ones (see the module docstring)."""
    clean = data.evaluated["clean"]
    clean = clean.take(np.arange(len(clean.image)) < (config.attack_limit or len(clean.image)))
    y = labels[torch.from_numpy(clean.image)]
    calibration = data.evaluated["calibration"].images
    attackers = {name: standardised(s, calibration, config.batch_size)
                 for name, s in surrogates.items()}
    if len(attackers) > 1:
        attackers["all"] = summed(list(attackers.values()))
    featurizer = _Featurizer(subject, layers, config.batch_size)
    evaluated = dict(data.evaluated)
    for name, surrogate in {"fixed": None, **attackers}.items():
        adversarial, found = adaptive_pgd(subject.classifier, surrogate, clean.images, y,
                                          config.adaptive, config.batch_size)
        key = "pgd-fixed" if surrogate is None else f"adaptive-{name}"
        if found.any():
            evaluated[key] = featurizer.part(key, adversarial[found], clean.image[found.numpy()])
    return replace(data, evaluated=evaluated)


def compare_detectors(
    model: nn.Module,
    *,
    train: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out_dir: str | Path,
    config: ComparisonConfig = ComparisonConfig(),
    screener_path: str | Path | None = None,
    progress: bool = False,
) -> ComparisonReport:
    """Run every detector of `config` on the same adversarial sets; see the module docstring.

    Args:
        model: classifier of [N, C, H, W] images in [0, 1] (ImageNet normalisation inside when
            `config.preprocess == "imagenet"`), C = 1 or 3.
        train, calibration, test: (images [N, C, H, W] in [0, 1], labels [N]) clean splits;
            only correctly classified images take part.
        out_dir: where the adversarial sets, the results and the figures go.
        config: see `ComparisonConfig`.
        screener_path: where to save the best detector set as a screener (`_best_screener`),
            calibrated on the calibration split at `config.operating_fpr`; None: no screener.
        progress: show progress bars.

    Raises:
        ValueError: too few images or adversarials to train, combine or evaluate.
    """
    out = Path(out_dir)
    subject = Subject.of(model, config.preprocess)
    layers = config.layers or default_layers(subject.classifier)
    knn = config.knn or KNNConfig(layers[-1])
    evolution = config.evolution or EvolutionConfig(layers)
    config = replace(config, mahalanobis=config.mahalanobis or MahalanobisConfig(layers),
                     lid=config.lid or LIDConfig(layers))
    collected = tuple(dict.fromkeys((*layers, knn.layer, *evolution.layers,
                                     *config.mahalanobis.layers, *config.lid.layers)))
    data = prepare(subject, train, calibration, test, out, config, collected, progress=progress)

    training: dict[str, EvolutionTrainReport] = {}
    detectors = {name: _detector(name, subject, data, config, knn, evolution, training, progress)
                 for name in config.detectors}
    if config.adaptive is not None:
        data = _with_adaptive(data, subject, test[1], _surrogates(detectors, subject), config,
                              collected)
    data = data.screened(PassRunner(
        subject.model, subject.classifier,
        Needs.union([Needs(layers=collected), *(d.needs for d in detectors.values())]),
        preprocess=config.preprocess, batch_size=config.batch_size))
    scores = {name: data.scores(d.score) for name, d in detectors.items()}
    combined_on = combiner_inputs(detectors, data.combiner)
    combiner = Combiner.fit(*combined_on)
    scores[COMBINED] = {key: combiner({n: scores[n][key] for n in detectors})
                        for key in data.evaluated}
    weights = combiner.weight_of()
    results = [row for name, s in scores.items()
               for row in attack_rows(name, s, data.attacks, config.operating_fpr)]
    per_layer = _per_layer_rows(data, layers, knn, subject, config, detectors)
    unseen = _unseen_rows(data, evolution, subject.identity, config, training, progress)
    files = _write(out, results, per_layer, unseen, scores, data.attacks)
    extra = detector_costs(subject, detectors,
                           data.evaluated["calibration"].images[:config.batch_size],
                           layers=collected)
    costs = {name: set_cost(extra, [name]) for name in detectors}
    costs[COMBINED] = set_cost(extra, list(detectors))
    aucs, combiners = _candidate_sets(detectors, combiner, combined_on, scores, data, config)
    chosen: tuple[str, ...] = ()
    screener_cost = None
    if screener_path is not None:
        screener = _best_screener(subject, detectors, combiners, aucs, scores, extra, config)
        files["screener"] = str(screener.save(screener_path))
        chosen = (*(["combined"] if screener.combiner else []), *screener.detectors)
        screener_cost = set_cost(extra, list(screener.detectors))
    images = {role: i.tolist() for role, i in data.ids.items()}
    images |= {"calibration": data.evaluated["calibration"].image.tolist(),
               "test": data.evaluated["clean"].image.tolist()}
    report = ComparisonReport(subject.identity, data.attack_stats, data.train_attack_stats,
                              results, per_layer, best_layers(per_layer), unseen, weights,
                              training, images, files, chosen, costs, screener_cost,
                              {"+".join(k): v for k, v in aucs.items()})
    write_json(out / "comparison-report.json", asdict(report))
    return report


def _candidate_sets(detectors: dict[str, Detector], combiner: Combiner,
                    combined_on: tuple[dict[str, np.ndarray], np.ndarray],
                    scores: dict[str, dict[str, np.ndarray]], data: ComparisonData,
                    config: ComparisonConfig
                    ) -> tuple[dict[DetectorSet, float], dict[DetectorSet, Combiner | None]]:
    """Every detector set's mean AUC over the measured attacks (all attacks where none is), and
    its combination: none for one detector alone, else a logistic regression fitted on the
    combiner images' scores `combined_on` (`combiner_inputs`; `combiner` for all of them)."""
    fpr = config.operating_fpr
    rows = [r for n in detectors for r in attack_rows(n, scores[n], data.attacks, fpr)]
    measured = {r.attack for r in rows if r.measured} or set(data.attacks)
    combiners: dict[DetectorSet, Combiner | None] = {(name,): None for name in detectors}
    fitted_on, adversarial = combined_on
    aucs = {}
    for names in detector_sets(list(detectors)):
        if len(names) == 1:
            own = scores[names[0]]
        else:
            combiners[names] = combiner if len(names) == len(detectors) else \
                Combiner.fit({n: fitted_on[n] for n in names}, adversarial)
            own = {key: combiners[names]({n: scores[n][key] for n in names})
                   for key in data.evaluated}
        aucs[names] = mean_of([r.auc for r in attack_rows("", own, data.attacks, fpr)
                               if r.attack in measured])
    return aucs, combiners


def _best_screener(subject: Subject, detectors: dict[str, Detector],
                   combiners: dict[DetectorSet, Combiner | None], aucs: dict[DetectorSet, float],
                   scores: dict[str, dict[str, np.ndarray]],
                   costs: dict[str, float], config: ComparisonConfig) -> Screener:
    """The set with the best mean AUC among those costing at most `config.max_cost` forward
    passes (`_candidate_sets`), as a calibrated screener."""
    best = cheapest_within(aucs, costs, config.max_cost)
    screener = Screener(subject.model, {n: detectors[n] for n in best},
                        preprocess=config.preprocess, combiner=combiners[best],
                        batch_size=config.batch_size)
    return screener.calibrate_scores({n: scores[n]["calibration"] for n in best},
                                     config.operating_fpr)


def attack_rows(name: str, scores: dict[str, np.ndarray], attacks: Sequence[str],
                fpr: float) -> list[AttackEvaluation]:
    """`name`'s row on each attack: thresholds from the calibration scores, metrics on the clean
    test scores."""
    return [evaluate_attack(scores["calibration"], scores["clean"], scores[a], detector=name,
                            attack=a, operating_fpr=fpr) for a in attacks]


def _per_layer_rows(data: ComparisonData, layers: Sequence[str], knn: KNNConfig,
                    subject: Subject, config: ComparisonConfig, detectors: dict[str, Detector]
                    ) -> list[AttackEvaluation]:
    """kNN, Mahalanobis and LID on each feature layer alone ("knn:<layer>", ...)."""
    rows = []
    if "knn" in detectors:
        for layer in layers:
            detector = KNNDetector.fit(data.fit[0].features, data.labels,
                                       replace(knn, layer=layer), model=subject.identity)
            rows += attack_rows(f"knn:{layer}", data.scores(detector.score), data.attacks,
                                config.operating_fpr)
    for name, detector in detectors.items():
        if isinstance(detector, MahalanobisDetector | LIDDetector):
            scores = data.scores(lambda p, d=detector: d.layer_scores(d.scored_features(p)))
            for i, layer in enumerate(detector.layers):
                rows += attack_rows(f"{name}:{layer}", {k: v[:, i] for k, v in scores.items()},
                                    data.attacks, config.operating_fpr)
    return rows


def best_layers(per_layer: Sequence[AttackEvaluation]) -> dict[str, str]:
    """For each detector of the per-layer rows ("<detector>:<layer>"), the layer with the best
    mean AUC over the measured rows."""
    aucs: dict[str, dict[str, list[float]]] = {}
    for r in per_layer:
        if r.measured:
            name, layer = r.detector.split(":", 1)
            aucs.setdefault(name, {}).setdefault(layer, []).append(r.auc)
    return {name: max(layers, key=lambda k, a=layers: np.mean(a[k]))
            for name, layers in aucs.items()}


def _unseen_rows(data: ComparisonData, evolution: EvolutionConfig, identity: str,
                 config: ComparisonConfig, training: dict, progress: bool
                 ) -> list[AttackEvaluation]:
    """Each distance-evolution network trained without one attack and tested on it."""
    trained_on = sorted({p.attack for p in data.fit} - {CLEAN})
    left_out = [a for a in data.attacks if a in trained_on] if len(trained_on) > 1 else []
    rows = []
    for name in (d for d in config.detectors if d in _NETWORKS):
        for attack in left_out:
            detector = train_network(data, replace(evolution, network=_NETWORKS[name]),
                                     identity, progress, without=attack)
            training[f"{name} unseen:{attack}"] = detector.report
            rows += attack_rows(f"{name} unseen", data.scores(detector.score), [attack],
                                config.operating_fpr)
    return rows


def _write(out: Path, results: list[AttackEvaluation], per_layer: list[AttackEvaluation],
           unseen: list[AttackEvaluation], scores: dict[str, dict[str, np.ndarray]],
           attacks: Sequence[str]) -> dict[str, str]:
    """The results (JSON, CSV) and one ROC figure per attack; returns what was written."""
    write_results([*results, *per_layer, *unseen], out / "comparison.json",
                  out / "comparison.csv")
    files = {"results": str(out / "comparison.json"), "results_csv": str(out / "comparison.csv")}
    for attack in attacks:
        rows = [r for r in results if r.attack == attack]
        curves = {r.detector: (*roc(scores[r.detector]["clean"], scores[r.detector][attack]),
                               r.auc) for r in rows if r.measured}
        files[f"roc_{attack}"] = str(roc_figure(
            curves, out / f"comparison-roc-{attack}.png", f"{attack}: every detector",
            [f"{r.detector} on {attack}" for r in rows if not r.measured]))
    files["report"] = str(out / "comparison-report.json")
    return files


def combiner_inputs(detectors: dict[str, Detector], combiner: Sequence[Part]
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The detectors' scores of the combiner images, and which images are adversarial: what
    the combinations are fitted on (`Combiner.fit`, which raises ValueError where the combiner
    images lack clean or adversarial versions)."""
    scores = {name: np.concatenate([d.score(p.screen) for p in combiner])
              for name, d in detectors.items()}
    adversarial = np.concatenate([np.full(len(p.image), p.attack != CLEAN) for p in combiner])
    return scores, adversarial


def comparison_table(results: Sequence[AttackEvaluation],
                     costs: dict[str, float] | None = None) -> str:
    """A terminal table: rows detectors, columns attacks and their mean, cells "AUC / DR@5%"
    (the detection rate at the threshold calibrated to a 5% false-positive rate); an unmeasured
    cell reads "too few to measure" and the mean is over the measured cells. With `costs`, a
    last column gives each row's screen cost in forward passes ("-" where none is known)."""
    attacks = list(dict.fromkeys(r.attack for r in results))
    detectors = list(dict.fromkeys(r.detector for r in results))
    cells = {(r.detector, r.attack): r for r in results}
    width = max(len("detector"), *map(len, detectors))
    cell = len(TOO_FEW)
    head = f"{'detector':{width}} " + " ".join(f"{a:>{cell}}" for a in [*attacks, "mean"])
    if costs is not None:
        head += f" {'cost':>5}"
    lines = [head, "-" * len(head)]
    for name in detectors:
        rows = [cells.get((name, a)) for a in attacks]
        measured = [r for r in rows if r is not None and r.measured]
        line = ["-" if r is None else TOO_FEW if not r.measured
                else f"{r.auc:.3f} / {r.detection_rate[_DR_KEY]:.3f}" for r in rows]
        line.append(f"{np.mean([r.auc for r in measured]):.3f} / "
                    f"{np.mean([r.detection_rate[_DR_KEY] for r in measured]):.3f}"
                    if measured else TOO_FEW)
        text = f"{name:{width}} " + " ".join(f"{c:>{cell}}" for c in line)
        if costs is not None:
            text += f" {f'{costs[name]:.2f}x' if name in costs else '-':>5}"
        lines.append(text)
    return "\n".join(lines)
