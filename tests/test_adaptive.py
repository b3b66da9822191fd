"""Adaptive attacker: stays in the eps-ball and [0,1], its EOT gradient through a toy defence
with random resize-pad is finite and non-zero, and it raises the loss through the defence."""
import torch
from torch import nn

from vars_fast.attacks.adaptive import AdaptivePGD, DefendedLoss, draw_transforms, rand_min_size


class ToyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4, 8)

    def embed(self, x):
        return self.lin(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class ToyDefense:
    """Smoothing denoiser (3x3 blur, clamp), linear detector, resize-pad settings."""

    def __init__(self, size=16):
        torch.manual_seed(0)
        self.denoiser = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False))
        with torch.no_grad():
            self.denoiser[0].weight.zero_()
            for c in range(3):
                self.denoiser[0].weight[c, c] = 1.0 / 9
        self.detector = ToyDetector()
        self.threshold = 0.5
        self.rand_min_frac = 0.75
        self.image_size = size


def rec_loss(x):
    # "recommender" loss to maximise: brightness of the top-left quadrant (per sample)
    return x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 10


def test_eot_gradient_finite_nonzero():
    d = ToyDefense()
    g = torch.Generator().manual_seed(0)
    loss = DefendedLoss(rec_loss, d, rand=True, eot=3, generator=g)
    x = torch.rand(2, 3, 16, 16, generator=g).requires_grad_(True)
    out = loss(x)
    assert out.shape == (2,)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_draws_in_range():
    d = ToyDefense()
    lo = rand_min_size(d)
    assert lo == 12
    sizes, offsets = draw_transforms(50, 16, lo, torch.Generator().manual_seed(1), "cpu")
    assert sizes.min() >= lo and sizes.max() < 16
    assert (offsets >= 0).all() and (offsets + sizes.unsqueeze(1) <= 16).all()


def test_adaptive_pgd_ball_and_loss_increase():
    d = ToyDefense()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    eps = 8 / 255
    atk = AdaptivePGD(rec_loss, d, eps=eps, steps=5, eot=2, rand=True, detect_weight=0.0,
                      generator=torch.Generator().manual_seed(3))
    x_adv = atk(x)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    ev = DefendedLoss(rec_loss, d, rand=True, eot=8, detect_weight=0.0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ev2 = DefendedLoss(rec_loss, d, rand=True, eot=8, detect_weight=0.0,
                           generator=torch.Generator().manual_seed(4))
        assert (ev(x_adv) > ev2(x)).all()


def test_detector_penalty_pulls_distance_down():
    d = ToyDefense()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dist0 = (d.detector.embed(x) - d.detector.embed(d.denoiser(x))).norm(dim=1)
    d.threshold = float(dist0.min()) * 0.5  # both inputs start "flagged"
    atk = AdaptivePGD(lambda z: z.sum(dim=(1, 2, 3)) * 0, d, eps=16 / 255, steps=10, rand=False,
                      detect_weight=1.0, random_start=False)
    x_adv = atk(x)
    with torch.no_grad():
        dist1 = (d.detector.embed(x_adv) - d.detector.embed(d.denoiser(x_adv))).norm(dim=1)
    assert (dist1 < dist0).all()
