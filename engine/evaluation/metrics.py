"""Detection quality: thresholds from a clean calibration split, metrics on a held-out split.

All metrics come from scikit-learn. Scores are oriented so that higher = more adversarial.
A row with fewer than `MIN_ADVERSARIALS` adversarials is not measured: every table shows it as
"too few to measure", no mean counts it and no figure draws it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_score, recall_score, roc_auc_score, roc_curve

from frmap.engine.data.files import atomic_write_bytes, write_json
from frmap.engine.detectors.threshold import calibrate_threshold

FPRS = (0.01, 0.05, 0.10)
MIN_ADVERSARIALS = 10
TOO_FEW = "too few to measure"


@dataclass(frozen=True)
class AttackEvaluation:
    """One detector on one attack's adversarials versus the held-out clean images.

    Attributes:
        detection_rate: recall on the adversarials at each calibrated FPR (keys "1%", ...).
        test_fpr: the share of held-out clean images flagged at each calibrated FPR.
        precision, recall: at the operating FPR, on held-out clean + adversarial images.
    """

    detector: str
    attack: str
    n_clean: int
    n_adversarial: int
    auc: float
    detection_rate: dict[str, float]
    test_fpr: dict[str, float]
    operating_fpr: float
    precision: float
    recall: float

    @property
    def measured(self) -> bool:
        """At least `MIN_ADVERSARIALS` adversarials: enough for the row to mean something."""
        return self.n_adversarial >= MIN_ADVERSARIALS


def _pct(fpr: float) -> str:
    return f"{fpr * 100:g}%"


def evaluate_attack(
    calibration_clean: np.ndarray,
    test_clean: np.ndarray,
    adversarial: np.ndarray,
    *,
    detector: str,
    attack: str,
    operating_fpr: float = 0.05,
) -> AttackEvaluation:
    """Calibrate on `calibration_clean`, then measure on `test_clean` vs `adversarial`."""
    test_clean, adversarial = np.asarray(test_clean, float), np.asarray(adversarial, float)
    if test_clean.size == 0 or adversarial.size == 0:
        raise ValueError(f"{attack}: evaluation needs clean and adversarial scores")
    y = np.r_[np.zeros(test_clean.size), np.ones(adversarial.size)]
    s = np.r_[test_clean, adversarial]
    rates, fprs = {}, {}
    for fpr in FPRS:
        flagged = s > calibrate_threshold(calibration_clean, fpr)
        rates[_pct(fpr)] = float(recall_score(y, flagged))
        fprs[_pct(fpr)] = float(flagged[y == 0].mean())
    flagged = s > calibrate_threshold(calibration_clean, operating_fpr)
    return AttackEvaluation(
        detector=detector,
        attack=attack,
        n_clean=int(test_clean.size),
        n_adversarial=int(adversarial.size),
        auc=float(roc_auc_score(y, s)),
        detection_rate=rates,
        test_fpr=fprs,
        operating_fpr=operating_fpr,
        precision=float(precision_score(y, flagged, zero_division=0.0)),
        recall=float(recall_score(y, flagged)),
    )


def roc(test_clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve (scikit-learn)."""
    y = np.r_[np.zeros(len(test_clean)), np.ones(len(adversarial))]
    fpr, tpr, _ = roc_curve(y, np.r_[test_clean, adversarial])
    return fpr, tpr


def table(results: list[AttackEvaluation]) -> str:
    """A terminal table: one row per detector and attack, plus the mean over the measured
    attacks; an unmeasured row shows its counts and "too few to measure"."""
    head = (f"{'detector':14} {'attack':10} {'clean':>6} {'adv':>6} {'AUC':>6} "
            + " ".join(f"{'DR@' + _pct(f):>7}" for f in FPRS) + f" {'prec':>6} {'recall':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        counts = f"{r.detector:14} {r.attack:10} {r.n_clean:6d} {r.n_adversarial:6d} "
        lines.append(counts + (
            f"{r.auc:6.3f} " + " ".join(f"{r.detection_rate[_pct(f)]:7.3f}" for f in FPRS)
            + f" {r.precision:6.3f} {r.recall:6.3f}" if r.measured else TOO_FEW))
    for name in dict.fromkeys(r.detector for r in results):
        rows = [r for r in results if r.detector == name and r.measured]
        if len(rows) > 1:
            lines.append(
                f"{name:14} {'mean':10} {'':6} {'':6} {np.mean([r.auc for r in rows]):6.3f} "
                + " ".join(f"{np.mean([r.detection_rate[_pct(f)] for r in rows]):7.3f}"
                           for f in FPRS)
                + f" {np.mean([r.precision for r in rows]):6.3f}"
                + f" {np.mean([r.recall for r in rows]):6.3f}"
            )
    return "\n".join(lines)


def write_results(results: list[AttackEvaluation], json_path: Path, csv_path: Path) -> None:
    """Write the results as JSON and CSV (each atomically)."""
    write_json(json_path, [asdict(r) for r in results])
    buf = io.StringIO()
    fields = ["detector", "attack", "n_clean", "n_adversarial", "auc"]
    fields += [f"dr_{_pct(f)}" for f in FPRS] + [f"test_fpr_{_pct(f)}" for f in FPRS]
    fields += ["operating_fpr", "precision", "recall"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k in fields}
        row |= {f"dr_{k}": v for k, v in r.detection_rate.items()}
        row |= {f"test_fpr_{k}": v for k, v in r.test_fpr.items()}
        writer.writerow(row)
    atomic_write_bytes(csv_path, buf.getvalue().encode())
