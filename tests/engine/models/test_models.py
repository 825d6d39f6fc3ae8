"""Model loading: torchvision VGGs, weight files with clear errors, the normalisation layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from frmap.engine import IMAGENET_MEAN, IMAGENET_STD, VGG_ARCHS, Normalized, load_vgg, load_weights
from frmap.engine.models.vgg import read_state_dict, weights_enum


def small_cnn(width: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def built(model: nn.Module) -> nn.Module:
    model(torch.rand(1, 3, 6, 6))  # materialise the lazy layer
    return model


@pytest.mark.parametrize("arch", VGG_ARCHS)
def test_load_vgg_random(arch):
    with torch.device("meta"):  # the layout only: no memory, no initialisation cost
        model = load_vgg(arch, seed=3)
    assert isinstance(model, torchvision.models.VGG) and not model.training
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == arch.endswith("_bn")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs == {"11": 8, "13": 10, "16": 13, "19": 16}[arch[3:5]]


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = load_vgg("vgg11", seed=1), load_vgg("vgg11", seed=1), load_vgg("vgg11", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_weights_names_resolve_without_download():
    assert weights_enum("vgg19", "DEFAULT") is torchvision.models.VGG19_Weights.IMAGENET1K_V1
    bn_weights = torchvision.models.VGG11_BN_Weights.IMAGENET1K_V1
    assert weights_enum("vgg11_bn", "IMAGENET1K_V1") is bn_weights
    assert weights_enum("vgg16", "VGG16_Weights.IMAGENET1K_FEATURES").name == "IMAGENET1K_FEATURES"
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        weights_enum("vgg19", "imagenet")
    with pytest.raises(ValueError, match="neither a weights file"):
        load_vgg("vgg11", "best")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_vgg("resnet50")


def test_vgg_from_safetensors_file(tmp_path):
    source = load_vgg("vgg11", seed=5)
    path = tmp_path / "vgg11.safetensors"
    save_file(source.state_dict(), path)
    loaded = load_vgg("vgg11", path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source, target = built(small_cnn()), built(small_cnn())
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), path)
    assert load_weights(target, path) is target
    x = torch.rand(2, 3, 6, 6)
    assert torch.equal(target(x), source(x))


class NotWeights:
    pass


def test_bad_weight_files(tmp_path):
    model = built(small_cnn())
    pickled = tmp_path / "object.pt"
    torch.save({"model": NotWeights()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True refused"):
        load_weights(model, pickled)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_weights(model, listed)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(model, garbage)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(broken)
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "missing.pt")


def test_weights_of_another_architecture(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(built(small_cnn(width=5)).state_dict(), other)
    with pytest.raises(ValueError, match=r"does not fit Sequential: size mismatch"):
        load_weights(built(small_cnn()), other)
    with pytest.raises(ValueError, match=r"does not fit VGG: Missing key.*Unexpected key"):
        load_vgg("vgg11", other)


def test_normalized_is_a_differentiable_layer():
    torch.manual_seed(0)
    inner = built(small_cnn())
    net = Normalized(inner)
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(net(x), inner((x - mean) / std), rtol=0, atol=0)
    net(x).sum().backward()
    assert x.grad is not None and net.channels == 3
    assert set(net.state_dict()) == {f"model.{k}" for k in inner.state_dict()}
    with pytest.raises(ValueError, match="one value per channel"):
        Normalized(inner, mean=(0.5,), std=(0.2, 0.2))


def test_one_blas_thread_limits_numpys_blas_and_restores_it():
    from threadpoolctl import threadpool_info, threadpool_limits

    from frmap.engine.models import one_blas_thread

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    with threadpool_limits(2, user_api="blas"):
        assert blas_threads() and set(blas_threads()) == {2}
        with one_blas_thread():
            assert set(blas_threads()) == {1}
            a = np.random.default_rng(0).random((64, 64))
            np.testing.assert_allclose(a @ np.eye(64), a)
        assert set(blas_threads()) == {2}
