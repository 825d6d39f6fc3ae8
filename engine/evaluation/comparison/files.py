"""The files the comparison writes: its results as JSON and CSV, and one ROC figure per attack."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from frmap.engine.evaluation.figures import roc_figure
from frmap.engine.evaluation.metrics import AttackEvaluation, roc, write_results


def write_files(out: Path, results: list[AttackEvaluation], per_layer: list[AttackEvaluation],
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
