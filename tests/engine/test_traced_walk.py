"""The reverse walk reads any traceable CNN: each supported op against autograd in float64,
residual networks (torchvision ResNet-18 and ResNet-50), and the ops it refuses, by name."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_responses import assert_rel_close, images, randomize_batch_norm
from torch import nn

from frmap.bench.responses import METHODS, accuracy, runner
from frmap.engine import ResponseEngine
from frmap.engine.responses import reverse_walk
from frmap.kernels import RULES


def _reference(model: nn.Module, x: torch.Tensor, rule: str, target: str,
               twin: nn.Module | None = None, preprocess: str | None = None) -> torch.Tensor:
    """The autograd path's responses in float64 (of `twin`, the same weights with nn.ReLU
    modules, where `model` rectifies with functions, which that path refuses)."""
    ref = copy.deepcopy(twin or model).double()
    return ResponseEngine(ref, rule=rule, target=target, preprocess=preprocess,
                          path="autograd").responses(x.double())


def _walk(model: nn.Module, x: torch.Tensor, rule: str, target: str,
          preprocess: str | None = None) -> torch.Tensor:
    engine = ResponseEngine(copy.deepcopy(model).double(), rule=rule, target=target,
                            preprocess=preprocess, path="reverse_walk")
    return engine.responses(x.double())


class Convs(nn.Module):
    """Convolutions of every shape, batch norm, average pools, a view, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2)
        self.c = nn.Conv2d(8, 6, (3, 1), padding=(1, 0))
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2)
        self.adaptive = nn.AdaptiveAvgPool2d((2, 2))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6 * 4, 5)
        randomize_batch_norm(self)

    def forward(self, x):
        h = self.act(self.bn(self.a(x)))
        h = self.act(self.pool(self.b(h)))
        h = self.act(self.c(h))
        h = F.dropout(self.adaptive(h), 0.3, training=self.training)
        return self.head(self.drop(h.view(h.size(0), -1)))


class Pools(nn.Module):
    """Max-pools: overlapping and padded (torch's indices), stride = kernel after a ReLU (walked
    first) and after a convolution, ceil mode; a mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 8, 3, padding=1)
        self.overlap = nn.MaxPool2d(3, stride=2, padding=1)
        self.ceil = nn.MaxPool2d(2, ceil_mode=True)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.overlap(self.act(self.a(x)))
        h = F.max_pool2d(self.act(self.b(h)), 2)
        h = self.act(self.ceil(F.max_pool2d(self.c(h), (1, 2))))
        return self.head(h.mean((2, 3)))


class Sums(nn.Module):
    """Residual sums (`+`, `+=`, torch.add), a difference, a concatenation, constant shifts and
    scales, a value read by three ops, x + x."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(12, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.stem((x - 0.5) / 0.25))
        out = self.a(h)
        out += h
        h = self.act(out)
        h = self.act(torch.add(self.b(h), h) - 0.1 * self.a(h))
        h = self.act(self.c(torch.cat([h, h * self.gain], 1)))
        h = self.act(2.0 - h + (h + h) / 3)
        return self.head(-h.mean((2, 3)))


class Rectifiers(nn.Module):
    """ReLUs as functions and methods (`functional`), or as nn.ReLU modules (its twin)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1)
                                   for i in range(6))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(6))
        self.head = nn.Linear(6 * 8 * 8, 3)
        self.functional = functional

    def forward(self, x):
        ways = (F.relu, torch.relu, lambda t: t.relu(), lambda t: t.clamp(min=0),
                lambda t: t.clamp_min(0), lambda t: F.relu(t, inplace=True))
        for conv, act, way in zip(self.convs, self.acts, ways, strict=True):
            x = (way if self.functional else act)(conv(x))
            if conv is self.convs[1]:
                x = F.max_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


class FeaturesClassifier(nn.Module):
    """The most common CNN in the wild: `classifier(features(x))`, both nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


OPS = {"convs": (Convs, None), "pools": (Pools, None), "sums": (Sums, None),
       "rectifiers": (lambda: Rectifiers(True), lambda: Rectifiers(False)),
       "features_classifier": (FeaturesClassifier, None)}


@pytest.mark.parametrize("target", ["conv_max", "logit"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(OPS))
def test_each_supported_op_equals_autograd_in_float64(name, rule, target):
    make, make_twin = OPS[name]
    model = make().eval()
    twin = None if make_twin is None else make_twin().eval()
    x = images((2, 3, 16, 16), 20)
    expected = _reference(model, x, rule, target, twin)
    assert_rel_close(_walk(model, x, rule, target), expected, f"{name} {rule} {target}",
                     rtol=1e-10)


@pytest.mark.parametrize("precision", ["bf16", "bf16-backward"])
def test_the_common_layouts_take_bf16(resnets, precision):
    """The features + classifier layout and both ResNets run the bf16 precisions on the walk,
    near their float32 responses."""
    x = images((2, 3, 32, 32), 24)
    for model, preprocess in ((FeaturesClassifier().eval(), None),
                              (resnets["resnet18"], "imagenet"),
                              (resnets["resnet50"], "imagenet")):
        engine = ResponseEngine(model, preprocess=preprocess, precision=precision)
        assert engine.path == "reverse_walk"
        reference = ResponseEngine(model, preprocess=preprocess).responses(x)
        got = engine.responses(x)
        assert float((got - reference).norm() / reference.norm()) < 0.1


def resnet(arch: str) -> nn.Module:
    model = torchvision.models.get_model(arch)
    randomize_batch_norm(model)
    return model.eval()


@pytest.fixture(scope="module")
def resnets():
    return {arch: resnet(arch) for arch in ("resnet18", "resnet50")}


@pytest.mark.parametrize("target", ["conv_max", "logit"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_equal_autograd_in_float64(resnets, arch, rule, target):
    model = resnets[arch]
    x = images((2, 3, 32, 32), 21)
    expected = _reference(model, x, rule, target, preprocess="imagenet")
    got = _walk(model, x, rule, target, preprocess="imagenet")
    assert_rel_close(got, expected, f"{arch} {rule} {target}", rtol=1e-10)


def test_resnet_accepts_bf16_and_its_head_runs_on_chunks(resnets, monkeypatch):
    """bf16 runs on the walk, near float64; under a small budget the stem runs on chunks of
    images (the graph is cut after its max-pool) and the responses do not change."""
    model = resnets["resnet18"]
    x = images((3, 3, 64, 64), 22)
    expected = _reference(model, x, "guided", "conv_max", preprocess="imagenet")
    bf16 = ResponseEngine(model, precision="bf16").responses(x)
    assert float((bf16.double() - expected).norm() / expected.norm()) < 0.1
    engine = ResponseEngine(copy.deepcopy(model).double(), path="reverse_walk")
    program, target = engine._walk._to_conv_max, engine._walk._conv_max
    # the stem's max-pool takes 64 x 32 x 32 float64s per image: 0.5 MiB, 1.5 MiB for three
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", 1 << 20)
    head, chunk = reverse_walk._head(program, target, x.double())
    pool = next(i for i, s in enumerate(program.steps)
                if isinstance(s, reverse_walk._IndexedMaxPool))
    assert (head, chunk) == (pool + 1, 2)
    assert_rel_close(engine.responses(x.double()), expected, "by chunks", rtol=1e-10)


class Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 4, 3), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


class Odd(nn.Module):
    """One op the walk refuses, chosen by `how`."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.head, self.how = nn.Conv2d(3, 4, 3), nn.Linear(4, 2), how
        self.six = nn.ReLU6()

    def forward(self, x):
        h = self.conv(x)
        if self.how == "gelu":
            h = F.gelu(h)
        elif self.how == "product":
            h = h * self.conv(x)
        elif self.how == "quotient":
            h = h / self.conv(x)
        elif self.how == "relu6":
            h = self.six(h)
        elif self.how == "clipped":
            h = h.clamp(0, 6)
        elif self.how == "functional_conv":
            h = F.conv2d(h, self.conv.weight[:, :4])
        elif self.how == "training_dropout":
            h = F.dropout(h, 0.5, training=True)
        elif self.how == "branch" and x.sum() > 0:
            h = -h
        out = self.head(F.relu(h).mean((2, 3)))
        return (out, h) if self.how == "two_outputs" else out


@pytest.mark.parametrize(("model", "reason"), [
    (Gelu(), "does not support the GELU module 'act'"),
    (Odd("gelu"), r"does not support gelu at 'gelu' \(h = F.gelu\(h\)\)"),
    (Odd("product"), r"product of two signals: mul at 'mul' \(h = h \* self.conv\(x\)\)"),
    (Odd("quotient"), "dividing by a signal"),
    (Odd("relu6"), "does not support the ReLU6 module 'six'"),
    (Odd("clipped"), r"clamp only as a ReLU \(min=0, no max\)"),
    (Odd("functional_conv"), "does not support conv2d at 'conv2d'"),
    (Odd("training_dropout"), "dropout in training mode"),
    (Odd("branch"), "torch.fx cannot trace Odd's forward"),
    (Odd("two_outputs"), "must return one tensor"),
])
def test_refused_ops_take_the_autograd_path_and_say_why(model, reason):
    engine = ResponseEngine(model, preprocess=None, target="logit")
    assert engine.path == "autograd"
    assert re.search(reason, engine.fallback), engine.fallback
    with pytest.raises(ValueError, match=reason):
        ResponseEngine(model, preprocess=None, path="reverse_walk")
    with pytest.raises(ValueError, match=f"precision='bf16' needs the reverse walk, but .*"
                                         f"{reason}"):
        ResponseEngine(model, preprocess=None, precision="bf16")
    with pytest.raises(ValueError, match=f"compile=True needs the reverse walk, but .*{reason}"):
        ResponseEngine(model, preprocess=None, compile=True)


def test_the_resnet_benchmark_computes_one_response_four_ways(resnets):
    """`frmap bench responses --model resnet50` compares the walk, bf16, autograd and Captum:
    each as accurate as the benchmark demands against Captum in float64 (it raises if not)."""
    model = resnets["resnet18"]
    x = images((2, 3, 32, 32), 23)
    errors = accuracy(model, x, {m: runner(model, m, len(x))(x) for m in METHODS})
    assert errors["reverse_walk"]["l2_rel"] < 1e-5


@pytest.mark.parametrize("name", list(OPS))
def test_the_forward_pass_alone_gives_the_models_logits(name, monkeypatch):
    """The walk's forward pass alone equals the model's own output, in float64 to 1e-10, and
    `ResponseEngine.logits` in float32 to its rounding, with the head on chunks of images."""
    model = OPS[name][0]().eval()
    x = images((5, 3, 16, 16), 25)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    walk = ResponseEngine(copy.deepcopy(model).double(), preprocess=None,
                          path="reverse_walk")._walk
    assert_rel_close(walk.logits(x.double()), expected, name, rtol=1e-10)
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", 1 << 10)  # the head on chunks of images
    got = ResponseEngine(model, preprocess=None, path="reverse_walk").logits(x, 2)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_logits_need_the_walks_float32_forward_pass():
    x = images((2, 3, 16, 16), 26)
    for engine in (ResponseEngine(Convs().eval(), preprocess=None, path="autograd"),
                   ResponseEngine(Convs().eval(), preprocess=None, precision="bf16")):
        with pytest.raises(ValueError, match="no float32 forward pass"):
            engine.logits(x)
