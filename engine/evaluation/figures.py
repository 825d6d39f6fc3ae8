"""The study's figures (PNG): ROC curves, score histograms, and image / response / entropy."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from frmap.engine.data.files import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _left_out(ax: plt.Axes, left_out: Sequence[str]) -> None:
    """A legend entry naming what the figure does not draw."""
    if left_out:
        ax.plot([], [], " ", label="not drawn, too few adversarials to measure: "
                + ", ".join(left_out))


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str,
    left_out: Sequence[str] = (),
) -> Path:
    """One ROC curve per label: {label: (fpr, tpr, auc)}; the legend names `left_out`."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    _left_out(ax, left_out)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def score_histogram(
    clean: np.ndarray, adversarial: dict[str, np.ndarray], path: Path, xlabel: str,
    left_out: Sequence[str] = (),
) -> Path:
    """Histograms of clean vs adversarial scores (the paper's Fig. 4a); the legend names
    `left_out`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    everything = np.concatenate([clean, *adversarial.values()])
    bins = np.linspace(everything.min(), everything.max(), 40)
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean ({len(clean)})", density=True)
    for name, scores in adversarial.items():
        ax.hist(scores, bins=bins, alpha=0.45, label=f"{name} ({len(scores)})", density=True)
    _left_out(ax, left_out)
    ax.set(xlabel=xlabel, ylabel="density", title="clean vs adversarial scores")
    ax.legend(fontsize=8)
    return _save(fig, path)


@dataclass(frozen=True)
class TracePanel:
    """One row of the tracing figure: an input, its response image and its entropy map."""

    label: str          # e.g. "clean" or "fgsm"
    image: np.ndarray   # [H, W] or [H, W, 3] in [0, 1]
    response: np.ndarray  # [H, W] uint8 response image
    entropy: np.ndarray   # [H, W] local entropy (bits)
    predicted: str
    confidence: float
    score: float


def trace_figure(rows: list[TracePanel], path: Path) -> Path:
    """Image / feature response / local entropy, one row per input (the paper's Fig. 3)."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    vmax = max(float(r.entropy.max()) for r in rows) or 1.0
    for ax_row, r in zip(axes, rows, strict=True):
        ax_row[0].imshow(r.image, cmap="gray" if r.image.ndim == 2 else None, vmin=0, vmax=1)
        ax_row[0].set_title(f"{r.label}: {r.predicted} ({r.confidence:.2f})", fontsize=9)
        ax_row[1].imshow(r.response, cmap="gray", vmin=0, vmax=255)
        ax_row[1].set_title("feature response", fontsize=9)
        im = ax_row[2].imshow(r.entropy, cmap="magma", vmin=0, vmax=vmax)
        ax_row[2].set_title(f"local entropy, mean {r.score:.2f} bits", fontsize=9)
        fig.colorbar(im, ax=ax_row[2], fraction=0.046)
        for ax in ax_row:
            ax.axis("off")
    return _save(fig, path)
