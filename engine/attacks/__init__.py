"""The attacks of the detection study on classifiers taking images in [0, 1].

`run_attack(attack, model, images, labels)` attacks the correctly classified images only and
keeps an adversarial only where the model now predicts another class. The attacks are frozen
configs following the `Attack` protocol:

- `FGSM` (Linf) and `GradientAttack` (L2): one step along the loss gradient, with each image's
  smallest successful epsilon on a grid (`single_step`).
- `OnePixel`: differential evolution over one pixel's position and values (`one_pixel`).
- `DeepFool` and `Boundary`: foolbox 3's attacks (`foolbox_attacks`).

Adversarial sets (`sets`) are generated resumably, in shards.
"""

from frmap.engine.attacks.base import Attack, AttackResult, check_inputs, run_attack
from frmap.engine.attacks.foolbox_attacks import Boundary, DeepFool
from frmap.engine.attacks.one_pixel import OnePixel
from frmap.engine.attacks.registry import ATTACKS, make_attack
from frmap.engine.attacks.sets import (
    AdversarialSet,
    AttackStats,
    attack_stats,
    generate,
    load_adversarial_set,
)
from frmap.engine.attacks.single_step import FGSM, L2_EPSILONS, LINF_EPSILONS, GradientAttack

__all__ = [
    "ATTACKS",
    "FGSM",
    "L2_EPSILONS",
    "LINF_EPSILONS",
    "AdversarialSet",
    "Attack",
    "AttackResult",
    "AttackStats",
    "Boundary",
    "DeepFool",
    "GradientAttack",
    "OnePixel",
    "attack_stats",
    "check_inputs",
    "generate",
    "load_adversarial_set",
    "make_attack",
    "run_attack",
]
