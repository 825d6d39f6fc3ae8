"""The attacks by name, in the order the study reports them."""

from __future__ import annotations

from frmap.engine.attacks.base import Attack
from frmap.engine.attacks.foolbox_attacks import FOOLBOX_ATTACKS
from frmap.engine.attacks.lbfgs import LBFGS
from frmap.engine.attacks.one_pixel import FivePixel, OnePixel, ThreePixel
from frmap.engine.attacks.single_step import FGSM, GradientAttack

ATTACKS: dict[str, type[Attack]] = {
    a.name: a for a in (FGSM, GradientAttack, OnePixel, ThreePixel, FivePixel, *FOOLBOX_ATTACKS,
                        LBFGS)
}


def make_attack(name: str) -> Attack:
    """The attack called `name` (one of `ATTACKS`) with its default settings."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name]()

# The attacks of the feature-response entropy paper (METHOD section 1), which the demo runs.
PAPER_ATTACKS = ("fgsm", "gradient", "one_pixel", "deepfool", "boundary")
