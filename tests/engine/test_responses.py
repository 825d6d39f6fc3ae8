"""ResponseEngine: Captum as oracle, reverse walk vs autograd, batching, the model left intact."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, Saliency
from torch import nn

from frmap.engine import Normalized, ResponseEngine, load_vgg
from frmap.engine.models import DigitsCNN
from frmap.engine.responses import reverse_walk
from frmap.engine.responses.tracing import trace_ops
from frmap.kernels import RULES, response_score

CAPTUM = {"guided": (GuidedBackprop, {}), "deconvnet": (Deconvolution, {}),
          "gradient": (Saliency, {"abs": False})}


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64 on the host."""
    actual, expected = torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double()
    return float((actual - expected).norm() / expected.cpu().norm())


def assert_rel_close(actual, expected, what: str, rtol: float = 1e-5) -> None:
    """max |actual - expected| <= rtol * max |expected|, saying how many elements differ."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = rtol * float(expected.abs().max())
    bad = (actual - expected).abs() > tol
    if bad.any():
        worst = float((actual - expected).abs().max())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ by more than "
                             f"{tol:.3g} (max {worst:.3g}); first at {bad.nonzero()[:5].tolist()}")


def small_cnn() -> nn.Sequential:
    """A 1-channel chain: in-place ReLU, batch norm, a max-pool, a stride-2 conv, dropout."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 5),
    )
    randomize_batch_norm(net)
    return net.eval()


class Residual(nn.Module):
    """Not a chain: a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(8, 8, 3, padding=1))
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.act(h + self.block(h)).mean((2, 3)))


def randomize_batch_norm(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# one intra-op thread: steadier on a shared CPU; the results do not depend on it
pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def vgg11():
    return load_vgg("vgg11", seed=0)


def images(shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class ConvMaxOf(nn.Module):
    """Captum's forward for 'conv_max': sum over positions of the channel max of `layer`."""

    def __init__(self, net: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.net, self.layer = net, layer

    def forward(self, x):
        seen = []

        def keep(module, args, output):
            seen.append(output)

        handle = self.layer.register_forward_hook(keep)
        try:
            self.net(x)
        finally:
            handle.remove()
        return seen[-1].max(dim=1).values.sum((1, 2))


def captum(net: nn.Module, layer: nn.Module, rule: str, x: torch.Tensor, target):
    method, kwargs = CAPTUM[rule]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets hooks on the ReLUs
        if target == "conv_max":
            return method(ConvMaxOf(net, layer)).attribute(x.clone(), **kwargs)
        with torch.no_grad():
            top = net(x).argmax(1)
        classes = top if target == "logit" else torch.as_tensor(target)
        return method(net).attribute(x.clone(), target=classes, **kwargs)


def cases(vgg):
    """(name, model, captum net, conv_max layer, preprocess, images, paths)."""
    small, residual = small_cnn(), Residual().eval()
    return {
        "vgg11": (vgg, Normalized(vgg), vgg.features[19], "imagenet", images((2, 3, 64, 64)),
                  ("reverse_walk", "autograd")),
        "small": (small, small, small[7], None, images((3, 1, 16, 16), 1),
                  ("reverse_walk", "autograd")),
        "residual": (residual, residual, residual.act, None, images((2, 3, 12, 12), 2),
                     ("reverse_walk", "autograd")),
    }


@pytest.mark.parametrize("target", ["conv_max", "logit", "classes"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", ["vgg11", "small", "residual"])
def test_matches_captum(vgg11, name, rule, target):
    model, net, layer, preprocess, x, paths = cases(vgg11)[name]
    chosen = target if target != "classes" else [(3 * i + 1) % 4 for i in range(len(x))]
    expected = captum(net, layer, rule, x, chosen)
    for path in paths:
        engine = ResponseEngine(model, rule=rule, preprocess=preprocess, path=path)
        got = engine.responses(x, target=chosen)
        assert engine.path == path
        assert_rel_close(got, expected, f"{name} {rule} {target} {path}")


@pytest.fixture(scope="module")
def vgg11_bn():
    model = load_vgg("vgg11_bn", seed=4)
    randomize_batch_norm(model)
    return model


@pytest.mark.parametrize("target", ["conv_max", "logit"])
@pytest.mark.parametrize("rule", RULES)
def test_reverse_walk_matches_autograd_with_batch_norm(vgg11_bn, rule, target):
    x = images((2, 3, 48, 48), 3)
    walk = ResponseEngine(vgg11_bn, rule=rule, target=target, path="reverse_walk")
    autograd = ResponseEngine(vgg11_bn, rule=rule, target=target, path="autograd")
    assert_rel_close(walk.responses(x), autograd.responses(x), f"{rule} {target}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("budget", "pool", "chunk"), [(1200 << 10, 1, 1), (2200 << 10, 0, 2)])
def test_head_runs_depth_first_on_chunks_of_images(vgg11, monkeypatch, rule, budget, pool, chunk):
    """Under a small budget the first layers run on chunks of images; responses do not change."""
    x = images((3, 3, 64, 64), 11)
    expected = ResponseEngine(vgg11, rule=rule, path="autograd", target="logit").responses(x)
    # one image's largest activation is 64 x 64 x 64 floats = 1 MiB; pool inputs for the batch:
    # 3 MiB (pool 1), 1.5 MiB (pool 2), 0.75 MiB (pool 3)
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", budget)
    program, output, pools = _program_and_pools(vgg11, rule)
    assert reverse_walk._head(program, output, x) == (pools[pool] + 2, chunk)
    engine = ResponseEngine(vgg11, rule=rule, path="reverse_walk", target="logit")
    assert_rel_close(engine.responses(x), expected, f"{rule} by chunks of {chunk}")
    assert_rel_close(engine.responses(x), expected, f"{rule} by chunks of {chunk}, again")
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", 64 << 20)
    assert reverse_walk._head(program, output, x) == (0, 3)


def _program_and_pools(model: nn.Module, rule: str):
    """The walk's program of `Normalized(model)` for the logits, its output slot and the slots
    of its max-pool steps."""
    walk = reverse_walk.ReverseWalk(trace_ops(Normalized(model)), rule)
    pools = [i for i, step in enumerate(walk._full.steps)
             if isinstance(step, reverse_walk._MaxPool)]
    return walk._full, walk.traced.output, pools


def test_head_budget_follows_the_device(vgg11, monkeypatch):
    """Off the CPU the head has its own budget (its chunks only bound the peak there)."""
    program, output, pools = _program_and_pools(vgg11, "guided")
    x = torch.empty(3, 3, 64, 64, device="meta")  # shapes only
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", 1200 << 10)
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES_GPU", 2200 << 10)
    assert reverse_walk._head(program, output, x) == (pools[0] + 2, 2)
    assert reverse_walk._head(program, output, torch.empty(x.shape)) == (pools[1] + 2, 1)


def test_scores_are_the_fused_score_and_invariant_to_batch_size(vgg11):
    x, fp = images((5, 3, 64, 64), 4), np.ones((3, 3), dtype=bool)
    engine = ResponseEngine(vgg11, batch_size=5)
    scores = engine.scores(x, fp)
    assert scores.dtype == torch.float64 and scores.shape == (5,)
    torch.testing.assert_close(scores, response_score(engine.responses(x), fp), rtol=0, atol=0)
    for size in (1, 2):
        other = ResponseEngine(vgg11, batch_size=size).scores(x, fp)
        torch.testing.assert_close(other, scores, rtol=0, atol=1e-9)
    one_by_one = torch.cat([engine.responses(x[i:i + 1]) for i in range(5)])
    assert_rel_close(engine.responses(x), one_by_one, "responses in input order")


@pytest.mark.parametrize("path", ["reverse_walk", "autograd"])
def test_reruns_are_deterministic(vgg11, path):
    x = images((2, 3, 64, 64), 5)
    engine = ResponseEngine(vgg11, path=path)
    assert torch.equal(engine.responses(x), engine.responses(x))


def _state(model: nn.Module):
    return ([(name, type(m), id(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def test_model_is_left_unchanged(vgg11):
    x = images((2, 3, 64, 64), 6)
    vgg11.train()
    try:
        modules, state = _state(vgg11)
        with torch.no_grad():
            expected = vgg11.eval()(x)
        vgg11.train()
        ResponseEngine(vgg11, target="logit").scores(x, np.ones((3, 3)))
        ResponseEngine(vgg11, rule="deconvnet", path="autograd").responses(x)
        now_modules, now_state = _state(vgg11)
        assert now_modules == modules
        assert all(torch.equal(now_state[k], v) for k, v in state.items())
        assert all(m.training for m in vgg11.modules())
        assert all(p.grad is None for p in vgg11.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                       for m in vgg11.modules())
        with torch.no_grad():
            assert torch.equal(vgg11.eval()(x), expected)
    finally:
        vgg11.eval()


def test_out_of_memory_splits_the_batch(monkeypatch):
    model, x = small_cnn(), images((5, 1, 16, 16), 7)
    expected = ResponseEngine(model, preprocess=None, batch_size=1).responses(x)
    engine = ResponseEngine(model, preprocess=None, batch_size=4)
    real = engine._responses

    def tight(batch, classes):
        if len(batch) > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return real(batch, classes)

    monkeypatch.setattr(engine, "_responses", tight)
    with pytest.warns(RuntimeWarning, match="did not fit in memory"):
        got = engine.responses(x)
    assert torch.equal(got, expected)

    def broken(batch, classes):
        raise RuntimeError("something else")

    monkeypatch.setattr(engine, "_responses", broken)
    with pytest.raises(RuntimeError, match="something else"):
        engine.responses(x)


class FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Chain(nn.Module):
    """torchvision's VGG layout; `scale` != 1 or `pooled` make the forward differ from the chain."""

    def __init__(self, scale: float = 1.0, functional: bool = False, pooled: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(4 if pooled else 4 * 4 * 4, 3))
        self.scale, self.functional, self.pooled = scale, functional, pooled

    def forward(self, x):
        h = self.features(x)
        h = h.mean((2, 3)) if self.pooled else torch.flatten(h, 1) * self.scale
        return self.classifier(F.relu(h) if self.functional else h)


@pytest.mark.parametrize(("model", "where"), [
    (FunctionalHead(), "FunctionalHead.forward calls torch.nn.functional.relu"),
    (nn.Sequential(Block(), nn.Flatten(), nn.LazyLinear(2)),
     r"module '0' \(Block\) calls torch.relu"),
    (Chain(functional=True), "Chain.forward calls torch.nn.functional.relu"),
])
def test_functional_relu_walks_and_the_autograd_path_refuses_it(model, where):
    """The walk reads a functional ReLU as a ReLU (tests/engine/test_traced_walk.py checks its
    responses); on the autograd path the rule could not act there, so it raises."""
    x = images((2, 1, 8, 8), 8)
    model(x)
    assert ResponseEngine(model, preprocess=None).path == "reverse_walk"
    with pytest.raises(ValueError, match=where):
        ResponseEngine(model, preprocess=None, path="autograd").responses(x)


def test_paths_are_chosen_from_the_computation_at_construction():
    """Any forward the walk can read takes it, whatever the model's class: its own layout
    (scaled, pooled), a residual sum, the embedded DigitsCNN."""
    x = images((2, 1, 8, 8), 9)
    for model in (Chain(), Chain(scale=2.0), Chain(pooled=True)):
        walked = ResponseEngine(model, preprocess=None, target="logit")
        assert (walked.path, walked.fallback) == ("reverse_walk", None)
        assert_rel_close(walked.responses(x), ResponseEngine(
            model, preprocess=None, path="autograd", target="logit").responses(x),
            f"scale {model.scale} pooled {model.pooled}")
    for model in (Residual(), DigitsCNN()):
        assert ResponseEngine(model, preprocess=None).path == "reverse_walk"
    assert ResponseEngine(Chain(), preprocess=None, path="autograd").fallback is None


def test_numpy_images_and_one_class_for_all(vgg11):
    x = images((2, 3, 64, 64), 10)
    engine = ResponseEngine(vgg11, target=7)
    assert torch.equal(engine.responses(x.numpy()), engine.responses(x, target=[7, 7]))


@pytest.mark.parametrize(("bad", "error", "match"), [
    (images((3, 64, 64)), ValueError, r"shape \[N, C, H, W\]"),
    (images((2, 1, 64, 64)), ValueError, "3-channel images, got 1"),
    (images((0, 3, 64, 64)), ValueError, "empty batch"),
    (images((1, 3, 64, 64)) * 2, ValueError, r"in \[0, 1\]"),
    (images((1, 3, 64, 64)) - 0.5, ValueError, r"in \[0, 1\]"),
    (images((2, 3, 64, 64)).index_fill_(0, torch.tensor([1]), float("nan")), ValueError,
     r"NaN or Inf values \(images \[1\]\)"),
    ((images((1, 3, 64, 64)) * 255).to(torch.uint8), TypeError, "divide uint8 images by 255"),
    ([[0.5]], TypeError, "torch tensor or numpy array"),
])
def test_bad_images(vgg11, bad, error, match):
    with pytest.raises(error, match=match):
        ResponseEngine(vgg11).responses(bad)


@pytest.mark.parametrize(("target", "match"), [
    ("top", "unknown target"),
    (-1, "class index"),
    ([3], "2 integer class indices"),
    ([0.5, 1.0], "integer class indices"),
    ([0, -2], ">= 0"),
    ([0, 1000], "out of range: the model has 1000 outputs"),
])
def test_bad_targets(vgg11, target, match):
    with pytest.raises(ValueError, match=match):
        ResponseEngine(vgg11).responses(images((2, 3, 64, 64)), target=target)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rule": "lrp"}, "unknown rule"),
    ({"target": "max"}, "unknown target"),
    ({"batch_size": 0}, "batch_size"),
    ({"preprocess": "torch"}, "preprocess"),
    ({"path": "fast"}, "unknown path"),
    ({"precision": "float16"}, "unknown precision"),
    ({"precision": "bf16", "path": "autograd"}, "reverse walk only"),
    ({"device": "meta"}, "move it first"),
])
def test_bad_settings(vgg11, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResponseEngine(vgg11, **kwargs)


def test_bad_footprint_fails_before_any_response(monkeypatch):
    engine = ResponseEngine(small_cnn(), preprocess=None)
    monkeypatch.setattr(engine, "_responses", lambda *a: pytest.fail("computed responses"))
    with pytest.raises(ValueError, match="selects no pixel"):
        engine.scores(images((1, 1, 16, 16)), np.zeros((3, 3)))


# bf16: the walk's convolutions and linear layers in bfloat16, everything else exact given those
# activations. Relative L2 off float64 Captum, measured (VGG11 at 64 / the small chain): guided
# 0.049 / 0.055, deconvnet 0.12 / 0.067, gradient 0.35 / 0.074 (its signed sums cancel, and a
# channel-wise maximum of conv_max that bf16 ties moves the whole signal at that position); a
# wrong rule, mask or pool choice is off by order 1.
BF16_L2 = {"guided": 0.1, "deconvnet": 0.25, "gradient": 0.6}
# CUDA against the CPU's float64 Captum: float32 rounding in another order can flip a rare
# ReLU mask or pool choice, which moves a few pixels; a wrong step moves all of them.
CUDA_L2 = 1e-3
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                             reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def captum_float64(net: nn.Module, layer: nn.Module, rule: str, x: torch.Tensor, target):
    """Captum's responses of a float64 copy of `net`, on the CPU."""
    net64 = copy.deepcopy(net).double()
    layer64 = dict(net64.named_modules())[next(n for n, m in net.named_modules() if m is layer)]
    return captum(net64, layer64, rule, x.double(), target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", ["vgg11", "small"])
def test_bf16_responses(vgg11, name, rule, device):
    """Near float64 Captum, computed in bfloat16 (not float32), the score exact given them."""
    model, net, layer, preprocess, x, _ = cases(vgg11)[name]
    expected = captum_float64(net, layer, rule, x, "conv_max")
    model = model.to(device)
    engine = ResponseEngine(model, rule=rule, preprocess=preprocess, precision="bf16")
    float32 = ResponseEngine(model, rule=rule, preprocess=preprocess).responses(x.to(device))
    try:
        got = engine.responses(x.to(device))
        assert got.dtype == torch.float32 and got.device.type == device
        assert rel_l2(got, expected) <= BF16_L2[rule], rel_l2(got, expected)
        assert rel_l2(got, float32) > 1e-4, "the bf16 walk computed in float32"
        if device == "cpu":  # the fused score of exactly these responses
            fp = np.ones((3, 3), dtype=bool)
            torch.testing.assert_close(engine.scores(x, fp), response_score(got, fp), rtol=0,
                                       atol=0)
    finally:
        model.cpu()


class _RoundToBF16(torch.autograd.Function):
    """The identity that rounds its value, and the signal back through it, to bfloat16."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES)
def test_bf16_is_exact_given_bfloat16_activations(rule, device):
    """Captum in float64 with each conv's and linear layer's weights, input, output and the
    signal back through it rounded to bfloat16 (the walk's arithmetic, but accumulated in
    float64): the masks, pool choices, batch norm and the rest then see the same values. Equal
    on the CPU here (relative L2 0); the bound leaves room for a sum that float32 accumulation
    rounds to the other neighbour."""
    model, x = small_cnn(), images((3, 1, 16, 16), 1)
    net64 = copy.deepcopy(model).double()
    for m in net64.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.to(torch.bfloat16))
            m.register_forward_pre_hook(lambda m, args: (_RoundToBF16.apply(args[0]),))
            m.register_forward_hook(lambda m, args, out: _RoundToBF16.apply(out))
    expected = captum(net64, net64[7], rule, x.double(), "conv_max")
    engine = ResponseEngine(model.to(device), rule=rule, preprocess=None, precision="bf16")
    assert rel_l2(engine.responses(x.to(device)), expected) <= 1e-3


def test_bf16_weights_are_cast_once_and_again_after_a_change():
    model, x = small_cnn(), images((3, 1, 16, 16), 12)
    engine = ResponseEngine(model, preprocess=None, precision="bf16", target="logit")
    first = engine.responses(x)
    copies = dict(engine._walk.weights._copies.items())
    assert len(copies) == 2 * 5  # weight and bias of 3 convs and 2 linear layers
    assert torch.equal(engine.responses(x), first)
    assert all(engine._walk.weights._copies[w] is c for w, c in copies.items()), "cast again"
    try:
        with torch.no_grad():
            model[0].weight.mul_(-1)
        changed = engine.responses(x)
        fresh = ResponseEngine(model, preprocess=None, precision="bf16", target="logit")
        assert torch.equal(changed, fresh.responses(x))
        assert not torch.equal(changed, first)
    finally:
        with torch.no_grad():
            model[0].weight.mul_(-1)


def test_tf32_setting_is_restored(vgg11):
    """The engine turns cuDNN's TF32 off while it computes, and restores the caller's setting."""
    before = torch.backends.cudnn.allow_tf32
    try:
        for allowed in (True, False):
            torch.backends.cudnn.allow_tf32 = allowed
            ResponseEngine(vgg11).responses(images((1, 3, 32, 32)))
            assert torch.backends.cudnn.allow_tf32 is allowed
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("target", ["conv_max", "logit", "classes"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", ["vgg11", "small", "residual"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_matches_float64_captum(vgg11, name, rule, target, device):
    """Both paths on CUDA give Captum's float64 responses to `CUDA_L2`, as the CPU does."""
    model, net, layer, preprocess, x, paths = cases(vgg11)[name]
    chosen = target if target != "classes" else [(3 * i + 1) % 4 for i in range(len(x))]
    expected = captum_float64(net, layer, rule, x, chosen)
    model = model.to(device)
    try:
        for path in paths:
            engine = ResponseEngine(model, rule=rule, preprocess=preprocess, path=path)
            got = engine.responses(x.to(device), target=chosen)
            assert got.device.type == "cuda" and engine.path == path
            assert rel_l2(got, expected) <= CUDA_L2, f"{path}: {rel_l2(got, expected)}"
    finally:
        model.cpu()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_scores_are_the_fused_score_of_the_responses(vgg11, device):
    """On CUDA (the Triton score) the scores of the CPU's score of the same responses."""
    x, fp = images((3, 3, 64, 64), 13).to(device), np.ones((3, 3), dtype=bool)
    model = vgg11.to(device)
    try:
        for precision in ("float32", "bf16"):
            engine = ResponseEngine(model, precision=precision, batch_size=2)
            scores = engine.scores(x, fp)
            assert scores.device.type == "cuda" and scores.dtype == torch.float64
            expected = response_score(engine.responses(x).cpu(), fp, backend="reference")
            torch.testing.assert_close(scores.cpu(), expected, rtol=0, atol=1e-9)
    finally:
        vgg11.cpu()


def _hooked_features(net: nn.Module, x: torch.Tensor, names) -> tuple[torch.Tensor, dict]:
    """The logits and the spatial means of the named modules' outputs, by forward hooks."""
    modules, seen = dict(net.named_modules()), {}
    handles = [modules[n].register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out.flatten(2).mean(2) if out.ndim > 2
                                                else out.clone())) for n in names]
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        for h in handles:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("target", ["conv_max", "logit"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", ["vgg11", "small"])
def test_observe_gives_the_classifiers_own_pass(vgg11, monkeypatch, name, rule, target):
    """One walk gives the responses, the logits and the layers' pooled outputs, equal in float64
    to the classifier's own forward pass (hooks) and to the responses alone; the head runs on
    chunks of one image."""
    model, net, _, preprocess, x, _ = cases(vgg11)[name]
    model64 = copy.deepcopy(model).double()
    engine = ResponseEngine(model64, rule=rule, target=target, preprocess=preprocess)
    pooled = [n for n, m in engine._net.named_modules() if isinstance(m, nn.MaxPool2d)]
    hidden = [n for n, m in engine._net.named_modules()
              if isinstance(m, nn.ReLU) and n not in _fused_relus(engine._net)]
    layers = [*pooled, *hidden]
    monkeypatch.setattr(reverse_walk, "HEAD_BYTES", 1)
    seen = engine.observe(x.double(), {"square3": np.ones((3, 3))}, layers)
    logits, expected = _hooked_features(engine._net, x.double(), layers)
    torch.testing.assert_close(seen.logits, logits.float(), rtol=1e-6, atol=1e-6)
    for n in layers:
        torch.testing.assert_close(seen.layers[n], expected[n].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen.scores["square3"],
                               engine.scores(x.double(), np.ones((3, 3))), rtol=0, atol=0)
    walk = engine._walk.run(x.double(), None if target == "conv_max" else
                            torch.full((len(x),), -1), layers)
    assert_rel_close(walk.responses, engine.responses(x.double()), "responses", rtol=1e-10)
    assert_rel_close(walk.logits, logits, "logits", rtol=1e-10)


def _fused_relus(net: nn.Module) -> set[str]:
    """The ReLUs directly followed by a max-pool (the walk applies them after the pool)."""
    names = [(n, m) for n, m in net.named_modules() if not list(m.children())]
    return {n for (n, m), (_, after) in zip(names, names[1:], strict=False)
            if isinstance(m, nn.ReLU) and isinstance(after, nn.MaxPool2d)}


def test_taps_the_walk_cannot_give_are_refused():
    """A ReLU walked after its max-pool has no output of its own in the walk; the autograd path
    and a bfloat16 forward pass give none either."""
    net = small_cnn()
    engine = ResponseEngine(net, preprocess=None)
    assert engine.observes(["5", "11"])  # the pool, and dropout after a ReLU
    assert not engine.observes(["4"])
    with pytest.raises(ValueError, match="cannot give"):
        engine.observe(images((1, 1, 16, 16)), {}, ["4"])
    assert not ResponseEngine(net, preprocess=None, path="autograd").observes(["5"])
    assert not ResponseEngine(net, preprocess=None, precision="bf16").observes(["5"])
    assert ResponseEngine(net, preprocess=None, precision="bf16-backward").observes(["5"])
    # a module called twice has no one output to give
    twice = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    reused = nn.Sequential(twice[0], twice[1], nn.Conv2d(2, 2, 3), twice[1])
    assert not ResponseEngine(reused, preprocess=None, target="logit").observes(["1"])


@pytest.mark.parametrize("rule", RULES)
def test_bf16_backward_keeps_the_forward_pass_exact(vgg11, rule):
    """bf16 in the walk back only: the logits and features are float32's exactly, the responses
    near float64 Captum within the bf16 bounds, and not float32's."""
    model, net, layer, preprocess, x, _ = cases(vgg11)["vgg11"]
    float32 = ResponseEngine(model, rule=rule, preprocess=preprocess)
    mixed = ResponseEngine(model, rule=rule, preprocess=preprocess, precision="bf16-backward")
    layers = ["model.features.2", "model.classifier.1"]
    a = float32.observe(x, {}, layers)
    b = mixed.observe(x, {}, layers)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    for n in layers:
        torch.testing.assert_close(b.layers[n], a.layers[n], rtol=0, atol=0)
    got = mixed.responses(x)
    expected = captum_float64(net, layer, rule, x, "conv_max")
    assert rel_l2(got, expected) <= BF16_L2[rule]
    assert rel_l2(got, float32.responses(x)) > 1e-4


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "avx512_bf16"}, "bf16-backward"), ({"amx_bf16"}, "bf16-backward"),
    ({"avx512f", "avx2"}, "float32"), (set(), "float32")])
def test_auto_precision_follows_the_cpus_flags(monkeypatch, flags, expected):
    from frmap.engine.models import runtime
    from frmap.engine.responses import resolve_precision

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", torch.device("cpu"))
