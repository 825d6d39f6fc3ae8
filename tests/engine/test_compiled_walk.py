"""The compiled walk: its torch-ops-only steps against autograd for every op family (eager,
float64), the compiled graphs against autograd and the eager walk, a recompile when a weight
changes, and a compiled screener against the eager one on the digits. Compiling takes seconds a
graph, so few graphs are compiled here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_responses import assert_rel_close, images
from test_traced_walk import OPS
from torch import nn

from frmap.engine import ResponseEngine
from frmap.engine.data import load_digits_split
from frmap.engine.responses.compiled_walk import CompiledWalk
from frmap.engine.responses.reverse_walk import ReverseWalk
from frmap.engine.responses.tracing import trace_ops
from frmap.engine.screening import Screener
from frmap.kernels import RULES


def _classes(target: str, n: int) -> torch.Tensor | None:
    return None if target == "conv_max" else torch.arange(n) % 3


def _reference(model: nn.Module, x: torch.Tensor, rule: str, classes: torch.Tensor | None,
               twin: nn.Module | None = None) -> torch.Tensor:
    """The autograd path's float64 responses (of `twin`, with nn.ReLU modules, where `model`
    rectifies with functions, which that path refuses)."""
    engine = ResponseEngine(copy.deepcopy(twin or model).double(), rule=rule, preprocess=None,
                            path="autograd")
    return engine.responses(x.double(), "conv_max" if classes is None else classes)


@pytest.mark.parametrize("target", ["conv_max", "logit"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(OPS))
def test_the_torch_ops_walk_equals_autograd_in_float64(name, rule, target):
    """The walk that is compiled (boolean masks, torch's pool indices, no ReLU moved past its
    pool), run eagerly: the responses of autograd to 1e-10 and the model's logits."""
    make, make_twin = OPS[name]
    model = make().eval().double()
    twin = None if make_twin is None else make_twin().eval()
    x = images((3, 3, 16, 16), 30).double()
    classes = _classes(target, len(x))
    expected = _reference(model, x, rule, classes, twin)
    out = ReverseWalk(trace_ops(model), rule, native=True).run(x, classes, ())
    assert_rel_close(out.responses, expected, f"{name} {rule} {target}", rtol=1e-10)
    with torch.no_grad():
        assert_rel_close(out.logits, model(x), f"{name} logits", rtol=1e-10)


@pytest.mark.parametrize(("name", "rule", "target"), [("pools", "guided", "conv_max"),
                                                      ("sums", "deconvnet", "logit")])
def test_the_compiled_walk_equals_autograd_and_the_eager_walk(name, rule, target):
    """Float64 against autograd (overlapping and ceil-mode pools, residual sums, per-image
    classes); the taps and logits against the eager walk's; a class out of range refused."""
    model = OPS[name][0]().eval().double()
    x = images((2, 3, 16, 16), 31).double()
    classes = _classes(target, len(x))
    traced = trace_ops(model)
    eager = ReverseWalk(traced, rule)
    taps = [n for n, _ in model.named_modules() if n and eager.tappable(n)][-2:]
    out = CompiledWalk(traced, rule).run(x, classes, taps)
    expected = _reference(model, x, rule, classes)
    assert_rel_close(out.responses, expected, f"{name} {rule} {target}", rtol=1e-10)
    reference = eager.run(x, classes, taps)
    assert_rel_close(out.logits, reference.logits, "logits", rtol=1e-10)
    assert list(out.taps) == taps
    for tap in taps:
        assert_rel_close(out.taps[tap], reference.taps[tap], tap, rtol=1e-10)
    if classes is not None:
        with pytest.raises(ValueError, match="class index 3 is out of range"):
            CompiledWalk(traced, rule).run(x, torch.tensor([0, 3]), taps)


def test_a_changed_weight_compiles_again():
    """The graphs hold the weights as constants: an in-place change (an optimizer step, a
    load_state_dict) is seen on the next call, in float32 to the eager walk's rounding."""
    model = OPS["features_classifier"][0]().eval()
    x = images((1, 3, 16, 16), 32)
    engine = ResponseEngine(model, preprocess=None, compile=True)
    before = engine.responses(x)
    with torch.no_grad():
        model.features[0].weight.mul_(-1.5)
    after = engine.responses(x)
    assert not torch.allclose(before, after)
    eager = ResponseEngine(copy.deepcopy(model), preprocess=None).responses(x)
    assert_rel_close(after, eager, "after the change", rtol=1e-5)


def test_compiled_bf16_backward_equals_the_eager_walk():
    """The bfloat16 weight copies enter the graph as constants: the compiled walk in
    bf16-backward gives the eager walk's responses (relative L2 within 1e-3)."""
    model = OPS["features_classifier"][0]().eval()
    x = images((2, 3, 16, 16), 33)
    got = ResponseEngine(model, preprocess=None, precision="bf16-backward",
                         compile=True).responses(x)
    want = ResponseEngine(model, preprocess=None, precision="bf16-backward").responses(x)
    assert float((got - want).norm() / want.norm()) < 1e-3


def test_compile_needs_the_reverse_walk():
    with pytest.raises(ValueError, match="compile=True compiles the reverse walk"):
        ResponseEngine(OPS["convs"][0](), preprocess=None, path="autograd", compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ResponseEngine(OPS["convs"][0](), preprocess=None, compile="yes")


def test_a_compiled_screener_scores_as_the_eager_one(demo_detectors):
    """Entropy + kNN + squeezing on the digits, one image at a time and a batch of three: the
    compiled screener's scores and predictions equal the eager screener's to 1e-9."""
    model, detectors = demo_detectors
    test = load_digits_split("test")
    eager = Screener(model, detectors, batch_size=3)
    compiled = Screener(model, detectors, batch_size=3, compile=True)
    assert compiled.runner.engines[compiled.runner.walker]._compiled is not None
    for batch in (test.images[:1], test.images[1:2], test.images[2:5]):
        features, scores = compiled.scores(batch)
        expected_features, expected = eager.scores(batch)
        np.testing.assert_array_equal(features.predictions, expected_features.predictions)
        for name in expected:
            np.testing.assert_allclose(scores[name], expected[name], rtol=0, atol=1e-9,
                                       err_msg=name)
