"""The comparison as a terminal table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from frmap.engine.evaluation.metrics import TOO_FEW, AttackEvaluation

_DR_KEY = "5%"  # `AttackEvaluation.detection_rate` key of the FPR-5% detection rate


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
