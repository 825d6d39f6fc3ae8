"""What the comparison measured, and where it wrote it."""

from __future__ import annotations

from dataclasses import dataclass, field

from frmap.engine.attacks import AttackStats
from frmap.engine.detectors import EvolutionTrainReport
from frmap.engine.evaluation.metrics import AttackEvaluation


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
