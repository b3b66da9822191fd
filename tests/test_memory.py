"""Memory bounds: the adaptive attack's EOT chunks give the unchunked gradient, and the
estimates size loops and defence lanes from the config and the available memory."""
import pytest
import torch
from torch import nn

from vars_fast import memory_budget as memory
from vars_fast.attacks.adaptive import AdaptivePGD, DefendedLoss
from vars_fast.config import make_config


class _Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4, 8)

    def embed(self, x):
        return self.lin(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class _Defense:
    """A non-linear conv denoiser and a linear detector: enough for the gradient to depend on
    every draw, the denoiser Jacobian and the hinge."""

    def __init__(self):
        torch.manual_seed(0)
        self.denoiser = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1),
                                      nn.Sigmoid())
        self.detector = _Detector()
        self.threshold = 0.05
        self.rand_min_frac = 0.75
        self.image_size = 16


def _rec_loss(x):
    w = torch.linspace(-1, 1, x.shape[-1])
    return (x.pow(2) * w).mean(dim=(1, 2, 3)) * 10


@pytest.mark.parametrize("rand, eot, max_images", [(True, 5, 3), (True, 5, 6), (True, 4, 1), (True, 3, 9), (False, 1, 1)])
def test_eot_chunks_equal_the_unchunked_gradient(rand, eot, max_images):
    d = _Defense()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = DefendedLoss(_rec_loss, d, rand=rand, eot=eot, generator=torch.Generator().manual_seed(7))
    xr = x.clone().requires_grad_(True)
    ref_loss = whole(xr)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), xr)
    chunked = DefendedLoss(_rec_loss, d, rand=rand, eot=eot, generator=torch.Generator().manual_seed(7),
                           max_images=max_images)
    loss, grad = chunked.loss_and_grad(x)
    assert chunked.use_detector  # the hinge is part of both
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad.abs().sum() > 0


def test_adaptive_pgd_uses_the_chunked_gradient():
    d = _Defense()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    runs = [AdaptivePGD(_rec_loss, d, eps=8 / 255, steps=3, eot=4, generator=torch.Generator().manual_seed(3),
                        max_images=m)(x) for m in (None, 2)]
    assert (runs[1] - x).abs().max() <= 8 / 255 + 1e-6
    # sign steps: equal gradients up to float order give equal iterates except where a
    # gradient entry is ~0
    assert (runs[0] - runs[1]).abs().gt(1e-6).float().mean() < 0.01


def _paper(**sets):
    return make_config("paper", overrides={"backbone.weights": "none", **sets})


def test_loop_batch_and_adaptive_chunks_fit_the_budget():
    cfg = _paper()
    per = memory.image_bytes(cfg, grad=True)
    # 224 px through the paper denoiser and ResNet50 with autograd: about 1 GiB per image
    assert 0.5 * memory.GiB < per < 2 * memory.GiB
    assert memory.loop_batch(cfg, "cpu", 64, grad=True, available=8 * memory.GiB) == int(4 * memory.GiB // per)
    assert memory.loop_batch(cfg, "cpu", 64, grad=False, available=64 * memory.GiB) == 64
    assert memory.loop_batch(cfg, "cpu", 64, grad=True, available=1) == 1
    items, max_images = memory.adaptive_chunks(cfg, "cpu", 64, eot=4, available=8 * memory.GiB)
    assert 1 <= items < 64 and items <= max_images <= 4 * items
    live = items * memory.image_bytes(cfg, grad=True, backbone=False) + max_images * memory.image_bytes(
        cfg, grad=True, denoiser=False)
    assert live <= 4 * memory.GiB
    # small images: the whole requested chunk and all draws
    assert memory.adaptive_chunks(make_config("quick"), "cpu", 48, eot=2, available=8 * memory.GiB) == (48, 96)


def test_defense_lane_estimate_grows_with_the_batch():
    cfg = _paper()
    one = memory.defense_lane_bytes(cfg, 1, baseline=0)
    assert memory.defense_lane_bytes(cfg, 4, baseline=0) == pytest.approx(4 * one, rel=1e-6)
    assert memory.defense_lane_bytes(cfg, 1000, baseline=0) == memory.defense_lane_bytes(cfg, 32, baseline=0)
    # the paper's batch at 224 px does not fit a 24 GiB machine, the default preset's does
    assert memory.defense_lane_bytes(cfg, 1000, baseline=0) > 24 * memory.GiB
    assert memory.defense_lane_bytes(make_config("default"), 1000, baseline=0) < memory.GiB


def test_memory_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("VARS_FAST_MEMORY_GB", "0.001")
    assert memory.available_bytes("cpu") == 0  # the process already holds more than 1 MB
    monkeypatch.setenv("VARS_FAST_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="VARS_FAST_MEMORY_GB"):
        memory.available_bytes("cpu")
    monkeypatch.delenv("VARS_FAST_MEMORY_GB")
    assert memory.available_bytes("cpu") > 0
