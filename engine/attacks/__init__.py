"""The attacks of the detection study on classifiers taking images in [0, 1].

`run_attack(attack, model, images, labels)` attacks the correctly classified images only and
keeps an adversarial only where the model now predicts another class. The attacks are frozen
configs following the `Attack` protocol:

- `FGSM` (Linf) and `GradientAttack` (L2): one step along the loss gradient, with each image's
  smallest successful epsilon on a grid (`single_step`).
- `OnePixel`, `ThreePixel`, `FivePixel`: differential evolution over the positions and values
  of 1, 3 or 5 pixels (`one_pixel`).
- `DeepFool`, `Boundary` (from a `BlendedNoiseStart`), `PGD`, `BIM`, `MIFGSM` and
  `CarliniWagner`: foolbox 3's attacks (`foolbox_attacks`); PGD, BIM and MI-FGSM with each
  image's smallest successful epsilon on a grid.
- `LBFGS`: Szegedy et al.'s box-constrained L-BFGS on SciPy's L-BFGS-B (`lbfgs`).

Adversarial sets (`sets`) are generated resumably, in shards.
"""

from frmap.engine.attacks.base import Attack, AttackResult, check_inputs, run_attack
from frmap.engine.attacks.foolbox_attacks import (
    BIM,
    MIFGSM,
    PGD,
    BlendedNoiseStart,
    Boundary,
    CarliniWagner,
    DeepFool,
)
from frmap.engine.attacks.lbfgs import LBFGS
from frmap.engine.attacks.one_pixel import FivePixel, OnePixel, ThreePixel
from frmap.engine.attacks.registry import ATTACKS, PAPER_ATTACKS, make_attack
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
    "BIM",
    "FGSM",
    "LBFGS",
    "MIFGSM",
    "PGD",
    "L2_EPSILONS",
    "LINF_EPSILONS",
    "PAPER_ATTACKS",
    "AdversarialSet",
    "Attack",
    "AttackResult",
    "AttackStats",
    "BlendedNoiseStart",
    "Boundary",
    "CarliniWagner",
    "DeepFool",
    "FivePixel",
    "GradientAttack",
    "OnePixel",
    "ThreePixel",
    "attack_stats",
    "check_inputs",
    "generate",
    "load_adversarial_set",
    "make_attack",
    "run_attack",
]
