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


def test_detector_term_is_in_the_loss_only_when_asked():
    d = ToyDefense()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dist = (d.detector.embed(x) - d.detector.embed(d.denoiser(x))).norm(dim=1)
        d.threshold = float(dist.min()) * 0.5  # every image above m * tau: the hinge is active
        plain = DefendedLoss(rec_loss, d, rand=False, detect_weight=0.0)
        hinge = DefendedLoss(rec_loss, d, rand=False, detect_weight=2.0)
        assert not plain.use_detector and hinge.use_detector
        assert torch.equal(plain(x), rec_loss(d.denoiser(x)).float())  # w = 0: no detector term at all
        expected = rec_loss(d.denoiser(x)).float() - 2.0 * torch.relu(dist - 0.9 * d.threshold) / d.threshold
        torch.testing.assert_close(hinge(x), expected)
        assert (hinge(x) < plain(x)).all()


def test_tpr_at_fpr_keeps_the_false_positive_rate():
    from vars_fast.evaluate.adaptive import tpr_at_fpr

    d_clean = torch.arange(100, dtype=torch.float32)  # 0..99
    d_adv = torch.tensor([50.0, 94.5, 95.5, 200.0])
    tpr, thr = tpr_at_fpr(d_clean, d_adv, 0.05)
    assert int((d_clean > thr).sum()) <= 5  # 5% of 100
    assert thr == 94.0 and tpr == 0.75


class DistanceDefense(ToyDefense):
    """ToyDefense whose detector has the Defense's distance(x, D(x))."""

    def __init__(self, size=16):
        super().__init__(size)
        det = self.detector
        det.distance = lambda x, den: (det.embed(x) - det.embed(den)).norm(dim=1)


def test_unflagged_attacker_keeps_its_images_under_the_threshold():
    """The gated platform's attacker: every image it returns is unflagged, it hurts the raw
    image more than its start, and the score it keeps iterates by is -inf where flagged."""
    from vars_fast.attacks.adaptive import UnflaggedLoss
    from vars_fast.attacks.pgd import PGD

    d = DistanceDefense()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 0.5 + 0.25
    dist0 = d.detector.distance(x, d.denoiser(x)).detach()
    d.threshold = float(dist0.max()) * 1.1  # the clean images pass, large moves get flagged
    loss = UnflaggedLoss(rec_loss, d, detect_weight=1.0)
    eps = 32 / 255
    x_adv = PGD(loss, eps, steps=20, random_start=True, generator=g, keep_best=True)(x)
    with torch.no_grad():
        dist = d.detector.distance(x_adv, d.denoiser(x_adv))
        assert (dist <= d.threshold).all()
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert (rec_loss(x_adv) > rec_loss(x)).all()
        # without the hinge, PGD on the raw loss walks out of the threshold: the constraint binds
        free = PGD(rec_loss, eps, steps=20, random_start=True, generator=torch.Generator().manual_seed(0))(x)
        assert (d.detector.distance(free, d.denoiser(free)) > d.threshold).any()
        far = (x + 0.3).clamp(0, 1)
        flagged = d.detector.distance(far, d.denoiser(far)) > d.threshold
        assert flagged.any() and torch.isinf(loss(far)[flagged]).all()


def test_every_given_item_is_attacked_and_rows_record_the_attacker(tmp_path):
    """The evaluation's adaptive section with eval.adaptive.items = 0 on a tiny run: every
    item's image is an adaptive one (the base is the clean catalogue, nothing is mixed in),
    and the rows carry steps, EOT draws, items and the detector weight."""
    import json

    import numpy as np

    from test_evaluate import build_tiny_run
    from vars_fast.evaluate import Evaluation
    from vars_fast.evaluate.adaptive import adaptive

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = build_tiny_run(tmp_path / "run", evaluate=False)
        e = ctx.cfg.eval
        e.adaptive.items, e.adaptive.steps, e.adaptive.eot, e.adaptive.oracle_users = 0, 1, 2, 2
        users = [int(u) for u in (ctx.catalogue.test >= 0).nonzero().squeeze(1)[:3]]
        (ctx.run.path / "attacks" / "oracle_users.json").write_text(json.dumps({"users": users}))
        adaptive(Evaluation(ctx))
    finally:
        torch.set_num_threads(threads)
    N = ctx.catalogue.n_items
    clean = ctx.catalogue.images.numpy().astype(int)
    for tag in ("det", "rand"):
        adv = np.load(ctx.run.attack_file("VBPR", f"adaptive-pgd-{tag}", 8)).astype(int)
        assert adv.shape[0] == N
        moved = np.abs(adv - clean).reshape(N, -1).max(1)
        assert (moved > 0).all() and moved.max() <= 8
    A = ctx.run.rows("ranking", attack="adaptive-pgd", objective="train")
    assert {r["defense"] for r in A} == {"denoise", "denoise+rand", "detect+denoise", "detect+withhold"}
    for r in A:
        assert r["n_adaptive_items"] == N and r["steps"] == 1 and r["detect_weight"] == 1.0
        assert r["eot"] == (2 if r["defense"] == "denoise+rand" or r.get("against") == "denoise+rand" else 1)
    for dep in ("detect+denoise", "detect+withhold"):  # the strongest of the three attackers against it
        (w,) = [r for r in A if r["defense"] == dep]
        assert 0 <= w["flagged"] <= 1 and w["against"] in ("denoise", "denoise+rand", "unflagged")
    unflagged = np.load(ctx.run.attack_file("VBPR", "adaptive-pgd-unflagged", 8)).astype(int)
    assert np.abs(unflagged - clean).max() <= 8
    D = ctx.run.rows("detection", attack="adaptive-pgd")
    assert {r["variant"] for r in D} == {"denoise", "denoise+rand", "unflagged"}
    assert all(0 <= r["tpr_at_fpr05"] <= 1 and r["eot"] >= 1 for r in D)
    assert all(r["threshold_fpr05_from"] == "validation" and r["fpr05_on_test"] <= 1 for r in D)
    E = ctx.run.rows("ranking", attack="adaptive-pgd", objective="eval")
    assert {r["defense"] for r in E} == {"denoise", "denoise+rand"}
    assert all(r["n_users"] == 2 and r["steps"] == 1 for r in E)


class DistanceDetector(ToyDetector):
    def distance(self, x, den):
        return (self.embed(x) - self.embed(den)).norm(dim=1)


def test_detector_phase_trains_on_adaptive_views_when_asked():
    import dataclasses

    from vars_fast.config import AdaptiveTrainConfig, DefenseConfig
    from vars_fast.defense.training import epoch_plan, make_adaptive

    dcfg = DefenseConfig()
    assert all(ep["kinds"] == ["fgsm"] for ep in epoch_plan(dcfg) if ep["phase"] == "detector")
    hard = dataclasses.replace(dcfg, adaptive_train=AdaptiveTrainConfig(enabled=True, steps=2, eot=2))
    det_phase = [ep for ep in epoch_plan(hard) if ep["phase"] == "detector"]
    assert det_phase and all(ep["kinds"] == ["fgsm", "adaptive"] for ep in det_phase)
    d = ToyDefense()
    det = DistanceDetector()
    x = torch.round(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 255) / 255
    x_adv = make_adaptive(rec_loss, x, d.denoiser, det, hard, 8, 16, torch.Generator().manual_seed(8))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and (x_adv != x).any()
    torch.testing.assert_close(torch.round(x_adv * 255), x_adv * 255, rtol=0, atol=1e-3)  # the uint8 grid
