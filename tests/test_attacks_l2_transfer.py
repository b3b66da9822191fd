"""PGD-L2, the surrogate transfer attack and the benign corruptions: their invariants."""
import pytest
import torch

from vars_fast.attacks.pgd_l2 import PGDL2, l2_radius, project_l2
from vars_fast.attacks.surrogate import build_surrogate, feature_shift_loss, transfer_attack
from vars_fast.corruptions import gaussian_noise, jpeg


def _images(n=4, s=16, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _quadratic_loss(target):
    # a smooth per-sample loss with a known ascent direction: distance from a fixed target
    return lambda x: (x - target).pow(2).flatten(1).sum(1)


def test_l2_radius_matches_rms():
    # an L-inf sign perturbation of eps has RMS eps: its L2 norm is the radius for rms = eps
    d = torch.full((3, 8, 8), 8 / 255)
    assert l2_radius(8, (3, 8, 8)) == pytest.approx(float(d.norm()))


def test_project_l2_bounds_and_keeps_short_perturbations():
    x0 = _images()
    far = x0 + torch.randn_like(x0)
    p = project_l2(far, x0, 0.5)
    assert ((p - x0).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and p.min() >= 0 and p.max() <= 1
    near = (x0 + 1e-3 * torch.randn_like(x0)).clamp(0, 1)
    assert torch.allclose(project_l2(near, x0, 0.5), near)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_invariants(random_start):
    x = _images()
    target = _images(seed=1)
    loss = _quadratic_loss(target)
    eps = torch.tensor([0.1, 0.5, 1.0, 2.0])  # per-image radii
    run = lambda: PGDL2(loss, eps, steps=5, random_start=random_start,  # noqa: E731
                        generator=torch.Generator().manual_seed(3))(x)
    adv = run()
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert (loss(adv) > loss(x)).all()
    # the budget is used: the ascent direction is unconstrained by the box for most pixels
    assert (norms > 0.5 * eps).all()
    assert torch.equal(adv, run())  # deterministic for a fixed generator


def test_pgd_l2_concentrates_where_the_gradient_is():
    # a loss that only depends on one pixel: L2 steps put the whole budget there, unlike sign steps
    x = torch.full((1, 3, 8, 8), 0.5)
    adv = PGDL2(lambda z: z[:, 0, 0, 0], 0.3, steps=4)(x)
    d = (adv - x).abs()
    assert d[0, 0, 0, 0] == pytest.approx(0.3, abs=1e-5) and d.sum() == pytest.approx(0.3, abs=1e-5)


def test_pgd_l2_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        PGDL2(lambda x: x.sum((1, 2, 3)), 0.5, steps=0)


@pytest.fixture(scope="module")
def surrogate():
    torch.manual_seed(0)
    return build_surrogate("resnet18", "none")


def test_transfer_attack_invariants(surrogate):
    x = _images(n=3, s=32)
    eps = 8 / 255
    run = lambda: transfer_attack(surrogate, x, eps, steps=3, generator=torch.Generator().manual_seed(5))  # noqa: E731
    adv = run()
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv, run())
    shift = feature_shift_loss(surrogate, x)
    # the attack moves the surrogate's features further than its own random start does
    start = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) - 1) * eps).clamp(0, 1)
    assert (shift(adv) > shift(start)).all() and (shift(x) == 0).all()
    assert not any(p.requires_grad for p in surrogate.parameters())


def test_build_surrogate_rejects_unknown_name():
    from vars_fast.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.name"):
        build_surrogate("vgg11", "none")


def test_gaussian_noise_is_seeded_and_clamped():
    x = _images()
    a = gaussian_noise(x, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, gaussian_noise(x, 0.1, torch.Generator().manual_seed(1)))
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).std() == pytest.approx(0.1, rel=0.2)  # clamping shrinks it a little
    assert torch.equal(gaussian_noise(x, 0.0), x)


def test_jpeg_round_trip():
    # a smooth image (JPEG's target): lower quality loses more of it, and both stay close
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    x = torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0).repeat(2, 1, 1, 1)
    x = x + 0.05 * _images(n=2, s=32)
    x = x.clamp(0, 1)
    hi, lo = jpeg(x, 95), jpeg(x, 50)
    assert hi.shape == x.shape and hi.dtype == torch.float32 and hi.min() >= 0 and hi.max() <= 1
    err = lambda y: float((y - x).abs().mean())  # noqa: E731
    assert 0 < err(hi) < err(lo) < 0.1
    assert torch.equal(lo, jpeg(x, 50))
    with pytest.raises(ValueError, match="quality"):
        jpeg(x, 0)
