"""Minimal-epsilon search vs foolbox's epsilon sweep on digits test images.

Run: `pytest bench/bench_attacks.py --benchmark-only`. One group per attack; foolbox's sweep
is the baseline, and the minimal epsilons are asserted equal before timing. The images, attacks,
check and calls are those of `frmap bench attacks --quick` (`frmap.bench.attacks`).
"""

from __future__ import annotations

import foolbox
import pytest
import torch

import frmap.bench.attacks as bench_attacks
from frmap.bench.attacks import ATTACKS
from frmap.engine.attacks import run_attack
from frmap.engine.models import torch_settings

IMAGES = 40


@pytest.fixture(scope="module")
def digits():
    model, x, y = bench_attacks.digits(IMAGES)
    with torch_settings(1):
        yield model.requires_grad_(False), x, y


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
    bench_attacks.compare(attack, model, x, y)  # raises unless the minimal epsilons agree
    _info(benchmark, attack, x, "bisection")
    benchmark.pedantic(run_attack, args=(attack, model, x, y), rounds=3, iterations=1)
