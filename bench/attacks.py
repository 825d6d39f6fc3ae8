"""Minimal-epsilon search vs foolbox's epsilon sweep (FGSM, L2 gradient): `run`, `table`.

Both run in the same process on the same correctly classified digits test images, the same
epsilon grid and one intra-op thread; the minimal epsilon of every image must agree.
`bench_attacks.py` hands the same images, attacks, check and calls to pytest-benchmark.
"""

from __future__ import annotations

import time

import foolbox
import numpy as np
import torch

from frmap.engine.attacks import FGSM, AttackResult, GradientAttack, run_attack
from frmap.engine.data import load_digits_split
from frmap.engine.models import load_digits_model, predict, torch_settings


def foolbox_minimal_index(
    attack: FGSM | GradientAttack, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """The reference: each image's first successful index into `attack.epsilons` in foolbox's
    own sweep over the grid (-1: none). `model` must have its parameter gradients off."""
    sweep = {
        "fgsm": foolbox.attacks.LinfFastGradientAttack,
        "gradient": foolbox.attacks.L2FastGradientAttack,
    }
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device="cpu")
    _, _, success = sweep[attack.name]()(fmodel, x, y, epsilons=list(attack.epsilons))
    success = success.numpy()
    return np.where(success.any(0), success.argmax(0), -1)


def minimal_index(attack: FGSM | GradientAttack, result: AttackResult) -> np.ndarray:
    """Index into `attack.epsilons` of each image's minimal epsilon in `result` (-1: none)."""
    grid = np.asarray(attack.epsilons, dtype=np.float32)
    eps = result.epsilon.numpy().astype(np.float32)
    return np.where(result.success.numpy(), np.searchsorted(grid, eps), -1)


def check_same_index(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Raise AssertionError saying how many and which minimal epsilons differ."""
    differ = np.flatnonzero(ours != theirs)
    if len(differ):
        first = differ[:5]
        raise AssertionError(
            f"{what}: {len(differ)} of {len(ours)} minimal epsilons differ from foolbox's "
            f"sweep, first at {first.tolist()}: ours {ours[first].tolist()}, "
            f"foolbox {theirs[first].tolist()}"
        )


ATTACKS = (FGSM(), GradientAttack())


def digits(n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The digits model and those of the first `n` test digits it classifies correctly."""
    model = load_digits_model()
    test = load_digits_split("test")
    images, labels = test.images[:n], test.labels[:n]
    correct = predict(model, images)[0] == labels
    return model, images[correct], labels[correct]


def compare(
    attack: FGSM | GradientAttack, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict:
    """Both searches, timed once; raises AssertionError unless the minimal epsilons agree."""
    start = time.perf_counter()
    result = run_attack(attack, model, x, y)
    ours_s = time.perf_counter() - start
    model.requires_grad_(False)
    start = time.perf_counter()
    theirs = foolbox_minimal_index(attack, model, x, y)
    foolbox_s = time.perf_counter() - start
    check_same_index(minimal_index(attack, result), theirs, attack.name)
    return {
        "attack": attack.name,
        "succeeded": int(result.success.sum()),
        "ours_s": ours_s,
        "foolbox_s": foolbox_s,
        "speedup": foolbox_s / ours_s,
    }


def run(quick: bool = False) -> dict:
    """Time both searches on 300 digits test images (40 with `quick`) and 150 epsilons.

    Raises:
        AssertionError: An image's minimal epsilon differs between the two.
    """
    model, x, y = digits(40 if quick else 300)
    with torch_settings(1):
        rows = [compare(attack, model, x, y) for attack in ATTACKS]
    return {
        "images": len(x),
        "epsilons": len(ATTACKS[0].epsilons),
        "threads": 1,
        "device": "cpu",
        "torch": torch.__version__,
        "foolbox": foolbox.__version__,
        "results": rows,
    }


def table(result: dict) -> str:
    """The result of `run` as a text table."""
    lines = [
        f"minimal-epsilon search, {result['images']} correctly classified digits, "
        f"{result['epsilons']} epsilons, {result['threads']} thread ({result['device']}, "
        f"torch {result['torch']}, foolbox {result['foolbox']}); minimal epsilons identical",
        f"{'attack':<10}{'succeeded':>10}{'foolbox sweep s':>17}{'bisection s':>13}"
        f"{'speed-up':>10}",
    ]
    for row in result["results"]:
        lines.append(
            f"{row['attack']:<10}{row['succeeded']:>10}{row['foolbox_s']:>17.2f}"
            f"{row['ours_s']:>13.2f}{row['speedup']:>9.1f}x"
        )
    return "\n".join(lines)
