"""Minimal-epsilon search vs foolbox's epsilon sweep on digits test images.

Run: `pytest bench/bench_attacks.py --benchmark-only`. One group per attack; foolbox's sweep
is the baseline, and the minimal epsilons are asserted equal before timing.
"""

from __future__ import annotations

import foolbox
import pytest
import torch

import frmap.bench.attacks as bench_attacks
from frmap.engine.attacks import FGSM, GradientAttack, run_attack
from frmap.engine.data import load_digits_split
from frmap.engine.models import load_digits_model, predict, torch_settings

IMAGES = 40
ATTACKS = [FGSM(), GradientAttack()]


@pytest.fixture(scope="module")
def digits():
    model = load_digits_model().requires_grad_(False)
    test = load_digits_split("test")
    x, y = test.images[:IMAGES], test.labels[:IMAGES]
    correct = predict(model, x)[0] == y
    with torch_settings(1):
        yield model, x[correct], y[correct]


def _info(benchmark, attack, x, method: str) -> None:
    benchmark.group = f"{attack.name} minimal epsilon, {len(x)} digits x {len(attack.epsilons)} eps"
    benchmark.extra_info.update(
        method=method,
        images=len(x),
        epsilons=len(attack.epsilons),
        threads=1,
        torch=torch.__version__,
        foolbox=foolbox.__version__,
    )


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_foolbox_sweep(benchmark, digits, attack):
    model, x, y = digits
    _info(benchmark, attack, x, "foolbox sweep (baseline)")
    benchmark.pedantic(
        bench_attacks.foolbox_minimal_index, args=(attack, model, x, y), rounds=1, iterations=1
    )


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_bisection(benchmark, digits, attack):
    model, x, y = digits
    bench_attacks._compare(attack, model, x, y)  # raises unless the minimal epsilons agree
    _info(benchmark, attack, x, "bisection")
    benchmark.pedantic(run_attack, args=(attack, model, x, y), rounds=3, iterations=1)
