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


The package's modules, in the order the run uses them: `config` (what it runs), `data` (the
image sets by role), `detectors` (the detector factory), `adaptive_sets`, `rows` (scores to
evaluations, per layer, unseen attacks, the combiner's inputs), `choice` (the saved screener),
`files` (what it writes), `table` (the terminal table) and `run` (`compare_detectors`).
"""

from frmap.engine.evaluation.comparison.config import COMBINED, DETECTORS, ComparisonConfig
from frmap.engine.evaluation.comparison.report import ComparisonReport
from frmap.engine.evaluation.comparison.run import compare_detectors
from frmap.engine.evaluation.comparison.table import comparison_table

__all__ = [
    "COMBINED",
    "DETECTORS",
    "ComparisonConfig",
    "ComparisonReport",
    "compare_detectors",
    "comparison_table",
]
