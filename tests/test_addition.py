"""ADDITION baseline: per-image noise levels in range, a denoiser that learns, the 20% criterion,
threshold choice and checkpoint round-trip."""
import math

import pytest
import torch
from torch import nn

from vars_fast.config import AdditionConfig, ConfigError
from vars_fast.defense.addition import (Addition, NoiseLevelNet, NoiseReducer, build_addition, check_config,
                                        relative_change)


class ToyRec(nn.Module):
    """score = p_u . (q_i + f) + b_i with f = a fixed random conv encoder of the image (8-d):
    differentiable in the image, so the project's FGSM can attack it."""

    def __init__(self, n_users=60, n_items=80, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, dim, 5, stride=2, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.P = nn.Parameter(torch.rand(n_users, dim, generator=g) + 0.5)
        self.Q = nn.Parameter(torch.rand(n_items, dim, generator=g))
        self.b = nn.Parameter(torch.rand(n_items, generator=g) + 1.0)
        self.item_visual = None

    @property
    def device(self):
        return self.P.device

    def encode(self, x):
        return torch.tanh(self.conv(x.float())).mean(dim=(2, 3))

    def score(self, users, items, visual=None):
        if visual is None:
            visual = self.item_visual[items]
        p = self.P[users]
        if items.dim() == 2:  # users [U] against candidate lists [U, C]
            p = p.unsqueeze(1)
        return (p * (self.Q[items] + visual)).sum(-1) + self.b[items]


def _small_cfg(**kw):
    cfg = AdditionConfig()
    cfg.sigma_min, cfg.sigma_max = 0.03, 0.12
    cfg.width, cfg.depth, cfg.hidden = 16, 3, 8
    cfg.train_eps = [8, 16]
    cfg.batch_size = 8
    cfg.lr = 3e-3
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _rec_with_catalogue(cat):
    rec = ToyRec(cat.n_users, cat.n_items)
    with torch.no_grad():
        rec.item_visual = rec.encode(cat.images.float() / 255.0)
    return rec


def test_noise_levels_per_image_inside_the_configured_range(tiny_catalogue):
    rec = _rec_with_catalogue(tiny_catalogue)
    cfg = _small_cfg()
    add = build_addition(rec, torch.arange(10), cfg)
    with torch.no_grad():
        add.noise_net.mlp[0].weight.mul_(20)  # a steep net: the clamp of the range must still hold
    x = tiny_catalogue.images[:24].float() / 255.0
    sigma = add.noise_level(x)
    assert sigma.shape == (24,)
    assert torch.all(sigma >= 0.03) and torch.all(sigma <= 0.12)
    assert sigma.std() > 1e-4  # image dependent: not one level for every image
    # extreme inputs saturate at the bounds, never past them
    net = NoiseLevelNet(4, hidden=4, sigma_min=0.05, sigma_max=0.1)
    s = net(torch.tensor([[1e4] * 4, [-1e4] * 4, [0.0] * 4]))
    assert torch.all(s >= 0.05) and torch.all(s <= 0.1)


@pytest.fixture
def one_thread():
    """Training steps of these tiny modules are ~20x slower with 2 OpenMP threads on a busy
    2-core machine than with 1 (the same contention as ``recommenders.base.cpu_threads``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_fit_trains_both_modules_and_the_denoiser_loss_goes_down(tiny_catalogue, one_thread):
    torch.manual_seed(0)
    rec = _rec_with_catalogue(tiny_catalogue)
    cfg = _small_cfg(denoiser_epochs=6, noise_epochs=1)
    add = build_addition(rec, torch.arange(20), cfg)
    items = list(range(24))
    x = tiny_catalogue.images[:16].float() / 255.0
    sigma = torch.full((16,), 0.08)
    noisy = (x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    with torch.no_grad():
        err_before = float((add.denoiser(noisy, sigma) - x).abs().mean())
    noise_before = [p.detach().clone() for p in add.noise_net.mlp.parameters()]
    hist = add.fit(tiny_catalogue, items, cfg, torch.Generator().manual_seed(1))
    assert len(hist["denoiser"]) == 6 and len(hist["noise"]) == 1
    assert min(hist["denoiser"][1:]) < hist["denoiser"][0]
    with torch.no_grad():
        err_after = float((add.denoiser(noisy, sigma) - x).abs().mean())
    assert err_after < err_before
    assert any(not torch.equal(a, b) for a, b in zip(noise_before, add.noise_net.mlp.parameters()))
    assert all(p.requires_grad for p in rec.parameters())  # the recommender is left as it was
    assert all(p.grad is None for p in rec.parameters())  # ... and never updated
    assert not add.denoiser.training and not add.noise_net.training
    c = add.score_change(tiny_catalogue.images[40:48].float() / 255.0, torch.arange(40, 48))
    assert c.shape == (8,) and torch.all(torch.isfinite(c)) and torch.all(c >= 0)


class MeanColourRec(ToyRec):
    """ToyRec whose image feature is the image's mean brightness (in all 8 dims)."""

    def encode(self, x):
        return x.float().mean(dim=(1, 2, 3)).unsqueeze(1).expand(-1, 8)


def test_detection_flags_a_change_above_the_criterion_not_below():
    rec = MeanColourRec(n_users=6, n_items=5)

    class Shift(NoiseReducer):
        """A stand-in denoiser: brightens image 0 strongly, leaves image 1 almost unchanged."""

        def forward(self, z, sigma):
            out = torch.full_like(z, 0.5)
            out[0] = 1.0
            out[1] = 0.5 + 1e-3
            return out

    add = Addition(rec, torch.arange(6), NoiseLevelNet(8, 4, 0.01, 0.02), Shift(4, 2), change=0.2)
    x = torch.full((2, 3, 8, 8), 0.5)
    items = torch.tensor([0, 1])
    change, flagged = add.detect(x, items)
    assert change.shape == (2,)
    assert change[0] > 0.2 > change[1] >= 0
    assert flagged.tolist() == [True, False]
    # an explicit (validation-chosen) threshold replaces the criterion
    assert add.detect(x, items, threshold=float(change[0]) + 1)[1].tolist() == [False, False]
    # the criterion itself is the relative L1 change of the users' scores
    s_ref = add.scores(x, items)
    assert torch.allclose(change, relative_change(add.scores(add.process(x)[0], items), s_ref))


def test_choose_threshold_separates_validation_changes():
    add = Addition(ToyRec(), torch.arange(3), NoiseLevelNet(8), NoiseReducer(4, 2))
    thr = add.choose_threshold(torch.tensor([0.01, 0.02, 0.05]), torch.tensor([0.3, 0.4, 0.06]))
    assert 0.05 <= thr < 0.06 and add.threshold == thr


def test_checkpoint_round_trip(tmp_path):
    rec = ToyRec()
    add = build_addition(rec, torch.tensor([3, 1, 4]), _small_cfg(), change=0.25, seed=7)
    add.threshold = 0.123
    with torch.no_grad():
        add.noise_net.feat_mean.fill_(0.5)
    path = tmp_path / "addition.pt"
    add.save(path, extra={"note": "x"})
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "vars_fast.addition/1"
    back = Addition.load(path, rec)
    assert back.users.tolist() == [3, 1, 4] and back.change == 0.25 and back.seed == 7
    assert math.isclose(back.threshold, 0.123) and back.extra["note"] == "x"
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    items = torch.arange(4)
    assert torch.allclose(back.score_change(x, items), add.score_change(x, items))
    assert torch.equal(back.noise_level(x), add.noise_level(x))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an ADDITION checkpoint"):
        Addition.load(tmp_path / "bad.pt", rec)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="defense.addition.sigma_max"):
        check_config(_small_cfg(sigma_min=0.3, sigma_max=0.1))
    with pytest.raises(ConfigError, match="defense.addition.train_eps"):
        check_config(_small_cfg(train_eps=[]))
    with pytest.raises(ConfigError, match="defense.addition.depth"):
        check_config(_small_cfg(depth=1))
