"""What screening costs, in forward passes of the classifier, and the best detector set within a
budget.

A screen runs the classifier once (`PassRunner`), so a set's cost is `1 + sum of its detectors'
extras`, each extra measured beside the forward pass on the same images:

- the entropy detector: the walk back and the entropy of its responses (its reverse walk's
  forward pass is the classifier's);
- feature squeezing: its filters and the squeezed copies' forward passes (one per squeezer);
- the feature detectors: their own scoring of the features (and, for Mahalanobis with input
  pre-processing, its gradient steps and their forward passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import torch

from frmap.engine.detectors import Detector
from frmap.engine.detectors.screen_pass import Needs, PassRunner
from frmap.engine.evaluation.subject import Subject


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches, weight copies
    return min(_seconds(fn) for _ in range(repeats))


def detector_costs(subject: Subject, detectors: dict[str, Detector], images: torch.Tensor,
                   *, layers: Sequence[str] = (), repeats: int = 3,
                   slow: float = 1.0) -> dict[str, float]:
    """Each detector's extra cost beyond the forward pass, in forward passes of `images`.

    The forward pass is timed with the feature layers of every detector (hooks cost next to
    nothing); each detector's extra is the time of a pass holding what it needs, and of its
    scores, less that forward pass's, never below 0. Each time is the best of `repeats` after
    a warm-up, or of one where the forward pass takes longer than `slow` seconds (a large
    model: a comparison should not spend minutes timing it).
    """
    layers = tuple(dict.fromkeys((*layers, *(x for d in detectors.values() for x in d.layers))))
    n = len(images)

    def runner(needs: Needs) -> PassRunner:
        return PassRunner(subject.model, subject.classifier, needs,
                          preprocess=subject.preprocess, batch_size=n)

    plain = runner(Needs(layers=layers))
    if _seconds(lambda: plain.run(images)) > slow:
        repeats = 1
    forward = _best_time(lambda: plain.run(images), repeats)
    costs = {}
    for name, d in detectors.items():
        screen = runner(Needs.union([Needs(layers=layers), d.needs]))
        costs[name] = max(0.0, _best_time(lambda s=screen, d=d: d.score(s.run(images)),
                                          repeats) / forward - 1.0)
    return costs


def set_cost(costs: dict[str, float], names: Sequence[str]) -> float:
    """The cost of screening with the detectors `names`, in forward passes."""
    return 1.0 + float(sum(costs[n] for n in names))


def detector_sets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of `names`, in their order: singletons first, then pairs, ..."""
    return [s for k in range(1, len(names) + 1) for s in combinations(names, k)]


def cheapest_within(candidates: dict[tuple[str, ...], float], costs: dict[str, float],
                    max_cost: float | None) -> tuple[str, ...]:
    """The candidate set with the best score (its value) among those costing at most `max_cost`
    forward passes (any cost where None).

    Raises:
        ValueError: no candidate within the budget (naming the cheapest).
    """
    within = {s: v for s, v in candidates.items()
              if max_cost is None or set_cost(costs, s) <= max_cost}
    if not within:
        cheapest = min(candidates, key=lambda s: set_cost(costs, s))
        raise ValueError(f"no detector set screens within --max-cost {max_cost} forward "
                         f"passes; the cheapest, {'+'.join(cheapest)}, costs "
                         f"{set_cost(costs, cheapest):.2f}")
    return max(within, key=lambda s: (within[s], -set_cost(costs, s), -len(s)))


def mean_of(values: Sequence[float]) -> float:
    """The mean, NaN for none."""
    return float(np.mean(values)) if len(values) else float("nan")
