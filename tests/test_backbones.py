"""Backbones: shapes, own normalisation, frozen eval mode, no downloads."""
import pytest
import torch

from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [("resnet18", "none", 512, [128, 256, 512]), ("resnet50", "none", 2048, [512, 1024, 2048]),
         ("efficientnet_lite0", "pretrained", 1280, [40, 112, 320])]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    name, weights, fdim, chans = request.param
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name=name, weights=weights)), fdim, chans


def test_shapes(case):
    bb, fdim, chans = case
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert bb.features(x).shape == (2, fdim) and bb(x).shape == (2, fdim)
        maps = bb.stages(x)
        assert bb.classify(x).shape == (2, 1000)
    assert bb.feature_dim == fdim and bb.stage_channels == chans
    assert [tuple(m.shape) for m in maps] == [(2, chans[0], 8, 8), (2, chans[1], 4, 4), (2, chans[2], 2, 2)]


def test_frozen_eval_and_input_gradients(case):
    bb = case[0]
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()  # a frozen backbone refuses train mode: BN statistics stay ImageNet's
    assert not bb.training and not any(m.training for m in bb.modules())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    bb.features(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_normalises_its_own_input(case):
    bb = case[0]
    x = torch.rand(1, 3, 32, 32)
    got = bb._prep(x)
    torch.testing.assert_close(got, (x - bb.mean) / bb.std)
    if bb.name == "efficientnet_lite0":  # TF-style (p - 127) / 128
        torch.testing.assert_close(bb._prep(torch.full((1, 3, 4, 4), 127 / 255)), torch.zeros(1, 3, 4, 4))


def test_input_size_resizes():
    bb = build_backbone(BackboneConfig(name="resnet18", weights="none", input_size=64))
    assert [m.shape[-1] for m in bb.stages(torch.rand(1, 3, 32, 32))] == [8, 4, 2]


def test_lite0_pretrained_is_real_imagenet():
    bb = build_backbone(BackboneConfig())
    rnd = build_backbone(BackboneConfig(weights="none"))
    a, b = bb.net._conv_stem.weight, rnd.net._conv_stem.weight
    assert not torch.equal(a, b)
    # a flat grey image should not be confidently any class, but logits are finite and varied
    logits = bb.classify(torch.full((1, 3, 64, 64), 0.5))
    assert torch.isfinite(logits).all() and logits.std() > 0.1


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="resnet18", weights="none"))


def test_trainable_copy_is_independent(r18):
    bb = r18
    twin = bb.trainable_copy()
    assert all(p.requires_grad for p in twin.parameters()) and not any(p.requires_grad for p in bb.parameters())
    twin.train()
    assert twin.training
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(twin.parameters()), next(bb.parameters()))


def test_weights_path_and_clear_errors(tmp_path, r18):
    src = r18
    path = tmp_path / "r18.pth"
    torch.save(src.net.state_dict(), path)
    loaded = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    torch.testing.assert_close(loaded.net.conv1.weight, src.net.conv1.weight)
    with pytest.raises(ConfigError, match="backbone.weights"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "missing.pth")))


def test_resnet_pretrained_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match=r"--set backbone.weights=PATH"):
        build_backbone(BackboneConfig(name="resnet50", weights="pretrained"))


def test_channels_last_matches():
    bb = build_backbone(BackboneConfig(name="resnet18", weights="none"))  # own copy: converted in place
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = bb.features(x)
        bb.to(memory_format=torch.channels_last)
        torch.testing.assert_close(bb.features(x), ref, rtol=1e-4, atol=1e-4)
