"""The L-BFGS attack: the closed-form optimum of a linear model, and DeepFool on the digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from frmap.engine.attacks import LBFGS, DeepFool, run_attack
from frmap.engine.data import load_digits_split
from frmap.engine.models import load_digits_model, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def halfplane_model(theta: float) -> nn.Module:
    """Two-pixel images `[N, 1, 1, 2]`; logits (0, x1 + x2 - theta): class 1 iff x1 + x2 > theta."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        model[1].bias.copy_(torch.tensor([0.0, -theta]))
    return model


def test_linear_model_reaches_the_closed_form_optimum():
    """The smallest L2 step into x1 + x2 >= 1.6 inside [0, 1]^2: the projection (s, s) with
    s = (1.6 - x1 - x2) / 2 where it stays in the box; otherwise the clipped coordinate sits at
    1 and the other makes up the rest (0.95, 0.45 -> 1, 0.6)."""
    x = torch.tensor([[0.5, 0.7], [0.2, 0.1], [0.95, 0.45], [0.3, 0.9]])
    optimum = torch.tensor([[0.7, 0.9], [0.85, 0.75], [1.0, 0.6], [0.6, 1.0]])
    result = run_attack(LBFGS(search_steps=12), halfplane_model(1.6), x.view(-1, 1, 1, 2),
                        torch.zeros(len(x), dtype=torch.int64))
    assert result.success.all() and torch.equal(result.adv_labels, torch.ones(len(x)).long())
    adversarial = result.adversarial.view(-1, 2)
    distance = (optimum - x).double().norm(dim=1)
    assert (adversarial.sum(1) > 1.6).all()
    assert (result.epsilon >= distance - 1e-6).all()  # nothing in the box comes closer
    torch.testing.assert_close(result.epsilon, distance, rtol=0.01, atol=0)
    torch.testing.assert_close(adversarial, optimum, rtol=0, atol=0.005)


def test_unreachable_class_fails():
    """x1 + x2 <= 2 in the box: class 1 of theta 2.5 cannot be reached."""
    x = torch.tensor([[0.5, 0.7], [1.0, 1.0]]).view(-1, 1, 1, 2)
    result = run_attack(LBFGS(search_steps=4), halfplane_model(2.5), x,
                        torch.zeros(2, dtype=torch.int64))
    assert not result.success.any() and result.epsilon.isnan().all()
    assert torch.equal(result.adversarial, x)


def test_digits_in_box_misclassified_and_no_farther_than_deepfool():
    model = load_digits_model()
    test = load_digits_split("test")
    x, y = test.images[:12], test.labels[:12]
    result = run_attack(LBFGS(search_steps=8, maxiter=30), model, x, y)
    deepfool = run_attack(DeepFool(), model, x, y)
    ok = result.success
    assert torch.equal(ok, result.attacked) and ok.sum() >= 10
    adversarial = result.adversarial[ok]
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (predict(model, adversarial)[0] != y[ok]).all()
    torch.testing.assert_close((adversarial - x[ok]).flatten(1).double().norm(dim=1),
                               result.epsilon[ok], rtol=1e-6, atol=1e-6)
    both = ok & deepfool.success
    closer = (result.epsilon[both] <= deepfool.epsilon[both]).double().mean().item()
    print(f"L-BFGS no farther than DeepFool on {closer:.0%} of {int(both.sum())} digits")
    assert closer > 0.5 and not math.isnan(closer)
