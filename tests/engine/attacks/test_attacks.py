"""Attacks, the minimal-epsilon search against foolbox's sweep, and resumable adversarial sets."""

from __future__ import annotations

import dataclasses
import math

import foolbox
import numpy as np
import pytest
import torch
from torch import nn

import frmap.engine.data.shards as shard_store
from frmap.bench.attacks import check_same_index, foolbox_minimal_index, minimal_index
from frmap.engine.attacks import (
    ATTACKS,
    BIM,
    FGSM,
    LBFGS,
    MIFGSM,
    PGD,
    BlendedNoiseStart,
    Boundary,
    CarliniWagner,
    DeepFool,
    FivePixel,
    GradientAttack,
    OnePixel,
    ThreePixel,
    make_attack,
    run_attack,
)
from frmap.engine.attacks.sets import attack_stats, generate, load_adversarial_set
from frmap.engine.data import load_digits_split
from frmap.engine.models import load_digits_model, predict

FINE_LINF = tuple(float(e) for e in np.linspace(0, 0.2, 51)[1:])
FINE_L2 = tuple(float(e) for e in np.linspace(0, 1.0, 51)[1:])
SMALL = {
    "fgsm": FGSM(epsilons=FINE_LINF),
    "gradient": GradientAttack(epsilons=FINE_L2),
    "one_pixel": OnePixel(population=20, generations=10),
    "deepfool": DeepFool(),
    "boundary": Boundary(steps=100, start=BlendedNoiseStart(directions=20, steps=20)),
    "three_pixel": ThreePixel(population=20, generations=10),
    "five_pixel": FivePixel(population=20, generations=10),
    "pgd": PGD(steps=10),
    "bim": BIM(),
    "cw": CarliniWagner(binary_search_steps=3, steps=50),
    "mifgsm": MIFGSM(),
    "lbfgs": LBFGS(search_steps=6, maxiter=30),
}
PIXELS = {"one_pixel": 1, "three_pixel": 3, "five_pixel": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(channels: int, seed: int = 0) -> nn.Module:
    """A random 3-class CNN on 8x8 images, its output bias centred on `tiny_data` so that the
    classes are mixed and the inputs lie near decision boundaries."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).eval()
    with torch.no_grad():
        model[-1].bias -= model(tiny_data(channels)[0]).mean(0)
    return model


def tiny_data(channels: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random images; labels are filled in by `tiny_case`."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, 8, 8, generator=g), torch.zeros(n, dtype=torch.int64)


def tiny_case(channels: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model, images and labels; every image is classified correctly (labels = predictions)."""
    model = tiny_classifier(channels)
    x, _ = tiny_data(channels)
    return model, x, predict(model, x)[0]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["fgsm", "gradient"])
def test_epsilon_search_equals_foolbox_sweep_tiny(name, channels):
    attack = SMALL[name]
    model, x, y = tiny_case(channels)
    ours = minimal_index(attack, run_attack(attack, model, x, y))
    theirs = foolbox_minimal_index(attack, model.requires_grad_(False), x, y)
    assert (ours > 0).sum() >= len(x) // 2, "the grid should resolve most minimal epsilons"
    check_same_index(ours, theirs, f"{name}, {channels} channel(s)")


@pytest.mark.parametrize("name", ["fgsm", "gradient"])
def test_epsilon_search_equals_foolbox_sweep_digits(name):
    attack = make_attack(name)
    attack = dataclasses.replace(attack, epsilons=attack.epsilons[::5])
    model = load_digits_model()
    test = load_digits_split("test")
    x, y = test.images[:20], test.labels[:20]
    result = run_attack(attack, model, x, y)
    correct = result.attacked
    theirs = foolbox_minimal_index(attack, model.requires_grad_(False), x[correct], y[correct])
    ours = minimal_index(attack, result)[correct.numpy()]
    assert (ours >= 0).mean() > 0.8
    check_same_index(ours, theirs, f"{name} on digits")


@pytest.mark.parametrize("name", ["fgsm", "gradient"])
def test_epsilon_search_brackets_the_boundary(name):
    """The grid point below each minimal epsilon does not fool the model."""
    attack = SMALL[name]
    model, x, y = tiny_case(3)
    result = run_attack(attack, model, x, y)
    index = minimal_index(attack, result)
    below = [i for i in range(len(x)) if index[i] > 0]
    assert below
    for i in below:
        step = dataclasses.replace(attack, epsilons=(attack.epsilons[index[i] - 1],))
        assert not run_attack(step, model, x[i : i + 1], y[i : i + 1]).success.any(), i


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_succeeds_within_its_constraint(name, channels):
    attack = SMALL[name]
    model, x, y = tiny_case(channels)
    result = run_attack(attack, model, x, y, seed=3)
    ok = result.success
    assert ok.sum() >= len(x) // 2, f"{name}: only {int(ok.sum())} of {len(x)} succeeded"
    adv = result.adversarial
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv[~ok], x[~ok])
    assert torch.isnan(result.epsilon[~ok]).all() and not torch.isnan(result.epsilon[ok]).any()
    assert (predict(model, adv[ok])[0] != y[ok]).all()
    delta = (adv - x)[ok].flatten(1).double()
    eps = result.epsilon[ok]
    if name in ("fgsm", "pgd", "bim", "mifgsm"):
        assert (delta.abs().amax(1) <= eps + 1e-6).all()
        grid = torch.tensor(attack.epsilons, dtype=torch.float32)  # FGSM's grid is float32
        assert torch.isin(eps.float(), grid).all()
    elif name in PIXELS:
        changed = (adv != x)[ok].any(1).flatten(1).sum(1)
        assert (changed <= PIXELS[name]).all() and (changed >= 1).all(), changed
        assert torch.equal(eps, changed.double())
    elif name == "gradient":
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5)).all()
    else:
        torch.testing.assert_close(delta.norm(dim=1), eps, rtol=1e-6, atol=1e-6)


def _foolbox_linf(attack, name: str) -> foolbox.attacks.base.Attack:
    if name == "pgd":
        return foolbox.attacks.LinfPGD(rel_stepsize=attack.rel_stepsize, steps=attack.steps)
    if name == "mifgsm":
        return foolbox.attacks.MIFGSM(momentum=attack.momentum, rel_stepsize=attack.rel_stepsize,
                                      steps=attack.steps)
    return foolbox.attacks.LinfBasicIterativeAttack(rel_stepsize=attack.rel_stepsize,
                                                    steps=attack.steps)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_iterative_minimal_epsilon_is_foolbox_sweep(name):
    """Each image's adversarial is foolbox's own at the smallest epsilon of its sweep that
    succeeds (same seed: PGD's random start draws from torch's generator)."""
    attack = SMALL[name]
    model, x, y = tiny_case(1)
    result = run_attack(attack, model, x, y, seed=5)
    torch.manual_seed(5)
    fmodel = foolbox.PyTorchModel(model.requires_grad_(False), bounds=(0, 1))
    _, clipped, success = _foolbox_linf(attack, name)(fmodel, x, y, epsilons=list(attack.epsilons))
    for i in range(len(x)):
        hits = [e for e, s in enumerate(success) if s[i]]
        assert bool(result.success[i]) == bool(hits), i
        if hits:
            assert result.epsilon[i] == attack.epsilons[hits[0]]
            assert torch.equal(result.adversarial[i], clipped[hits[0]][i])
    assert result.success.sum() >= len(x) // 2


def test_carlini_wagner_is_foolbox():
    attack = SMALL["cw"]
    model, x, y = tiny_case(3)
    result = run_attack(attack, model, x, y)
    fmodel = foolbox.PyTorchModel(model.requires_grad_(False), bounds=(0, 1))
    _, adversarial, success = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=3, steps=50, stepsize=attack.stepsize,
        initial_const=attack.initial_const)(fmodel, x, y, epsilons=None)
    assert torch.equal(result.success, success) and success.sum() >= len(x) // 2
    assert torch.equal(result.adversarial[success], adversarial[success])


def test_only_correct_inputs_are_attacked():
    model, x, y = tiny_case(1)
    wrong = torch.tensor([0, 5, 6, 17])
    y = y.clone()
    y[wrong] = (y[wrong] + 1) % 3
    result = run_attack(SMALL["fgsm"], model, x, y)
    expected = torch.ones(len(x), dtype=torch.bool)
    expected[wrong] = False
    assert torch.equal(result.attacked, expected)
    assert not result.success[wrong].any()
    assert torch.equal(result.adversarial[wrong], x[wrong])


def test_stats_match_direct_computation(tmp_path):
    model, x, y = tiny_case(3)
    y = y.clone()
    y[:3] = (y[:3] + 1) % 3  # misclassified: never attacked
    attack = SMALL["gradient"]
    aset = generate(attack, model, x, y, tmp_path, shard_size=7, progress=False)
    stats = attack_stats(aset)
    # deterministic; one batch instead of shards changes the gradients by rounding only
    result = run_attack(attack, model, x, y)
    ok = result.success
    with torch.no_grad():
        probs = torch.softmax(model(result.adversarial[ok]).double(), 1)
    new = probs.argmax(1)
    assert stats.inputs == len(x)
    assert stats.attacked == int(result.attacked.sum()) == len(x) - 3
    assert stats.succeeded == int(ok.sum()) == len(aset.index)
    assert stats.success_rate == pytest.approx(int(ok.sum()) / (len(x) - 3))
    assert stats.true_confidence == pytest.approx(
        float(probs[torch.arange(len(new)), y[ok]].mean()), abs=1e-6
    )
    assert stats.adv_confidence == pytest.approx(float(probs.max(1).values.mean()), abs=1e-6)
    assert torch.equal(aset.index, torch.nonzero(ok)[:, 0])
    assert torch.equal(aset.adv_labels, new)
    torch.testing.assert_close(aset.images, result.adversarial[ok], rtol=0, atol=1e-6)
    assert torch.equal(aset.labels, y[ok])


def _assert_same_set(a, b) -> None:
    for field in dataclasses.fields(a):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), field.name
        else:
            assert va == vb, field.name


def test_resume_after_interruption_gives_the_same_set(tmp_path, monkeypatch):
    model, x, y = tiny_case(1)
    attack = SMALL["one_pixel"]  # random: the resumed shards must reuse their seeds
    kwargs = dict(shard_size=5, seed=7, progress=False)
    whole = generate(attack, model, x, y, tmp_path / "whole", **kwargs)
    assert whole.attacked == len(x) and len(whole.index) > 0

    out = tmp_path / "resumed"
    written = []
    original = shard_store.atomic_write_bytes

    def killed_after_two(path, data):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path)
        original(path, data)

    monkeypatch.setattr(shard_store, "atomic_write_bytes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(attack, model, x, y, out, **kwargs)
    monkeypatch.undo()
    (out / ".frmap-shard-00002.npz.x1y2.tmp").write_bytes(b"half a shard")  # killed mid-write
    with pytest.raises(ValueError, match="incomplete"):
        load_adversarial_set(out)

    resumed = generate(attack, model, x, y, out, **kwargs)
    _assert_same_set(resumed, whole)
    assert not list(out.glob(".*.tmp"))
    _assert_same_set(load_adversarial_set(out), whole)
    assert len(list(out.glob("shard-*.npz"))) == math.ceil(len(x) / 5)


def test_generate_refuses_a_directory_holding_another_set(tmp_path):
    model, x, y = tiny_case(1)
    generate(SMALL["fgsm"], model, x, y, tmp_path, shard_size=8, progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate(SMALL["fgsm"], model, x, y, tmp_path, shard_size=8, seed=1, progress=False)
    with pytest.raises(ValueError, match="attack"):
        generate(SMALL["gradient"], model, x, y, tmp_path, shard_size=8, progress=False)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds no adversarial set"):
        generate(SMALL["fgsm"], model, x, y, tmp_path, shard_size=8, progress=False)


def test_model_flags_restored_and_no_parameter_gradients():
    model, x, y = tiny_case(1)
    model.train()
    run_attack(SMALL["deepfool"], model, x, y)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "images, labels, error, match",
    [
        (torch.rand(4, 1, 8, 8) * 2, torch.zeros(4, dtype=torch.int64), ValueError, r"\[0, 1\]"),
        (-torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), ValueError, r"\[0, 1\]"),
        (torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.int64), ValueError, "shape"),
        (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), ValueError, "shape"),
        (torch.full((4, 1, 8, 8), math.nan), torch.zeros(4, dtype=torch.int64), ValueError, "NaN"),
        (
            torch.ones(4, 1, 8, 8, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.int64),
            TypeError,
            "floating",
        ),
        (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64), ValueError, "labels"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4), TypeError, "integers"),
        (torch.rand(4, 1, 8, 8), torch.full((4,), 3), ValueError, "classes"),
        (np.random.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), TypeError, "tensors"),
        (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64), ValueError, "rejects"),
    ],
)
def test_bad_inputs_raise(images, labels, error, match, tmp_path):
    model = tiny_classifier(1)
    with pytest.raises(error, match=match):
        run_attack(SMALL["fgsm"], model, images, labels)
    with pytest.raises(error, match=match):
        generate("fgsm", model, images, labels, tmp_path, progress=False)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("nope")
    with pytest.raises(TypeError, match="pixels"):  # fixed by the class: three_pixel has 3
        OnePixel(pixels=3)
    with pytest.raises(ValueError, match="generations >= 0"):
        ThreePixel(generations=-1)
    with pytest.raises(ValueError, match="directions >= 1"):
        Boundary(start=BlendedNoiseStart(directions=0))
    with pytest.raises(ValueError, match="steps >= 1"):
        PGD(steps=0)
    with pytest.raises(ValueError, match="increasing"):
        BIM(epsilons=(0.1, 0.1))
    with pytest.raises(ValueError, match="momentum >= 0"):
        MIFGSM(momentum=-0.5)
    with pytest.raises(ValueError, match="search_steps >= 1"):
        LBFGS(search_steps=0)
    with pytest.raises(ValueError, match="initial_const"):
        LBFGS(initial_const=0.0)
    with pytest.raises(ValueError, match="increasing"):
        FGSM(epsilons=(0.2, 0.1))
    with pytest.raises(ValueError, match="positive"):
        GradientAttack(epsilons=(0.0, 0.1))
    with pytest.raises(ValueError, match="population"):
        OnePixel(population=3)
