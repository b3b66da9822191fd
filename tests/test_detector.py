"""Detector (encoder + projection head), the Defense object, threshold choice, checkpoints."""
import math

import pytest
import torch
from torch import nn

from vars_fast.defense import Defense, Denoiser, Detector, load_defense, save_defense

BB = {"name": "efficientnet_lite0", "weights": "none", "input_size": 0}


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    den = Denoiser(width=4, n_res_blocks=1, patch_size=8, heads=1, embed_dim=8, image_size=32)
    det = Detector(BB, proj_hidden=16, proj_dim=8)
    return den, det


def test_detector_encoder_trainable_and_bn_frozen(parts):
    _, det = parts
    det.train()
    assert all(p.requires_grad for p in det.encoder.parameters())
    bns = [m for m in det.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)  # ImageNet statistics are kept
    z = det.embed(torch.rand(3, 3, 32, 32))
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    z.sum().backward()
    assert det.encoder.net._conv_stem.weight.grad is not None
    det.zero_grad(set_to_none=True)
    det.eval()


def test_defense_distance_detect_and_purify(parts):
    den, det = parts
    d = Defense(den, det, threshold=0.5, rand_min_frac=0.75, image_size=32)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        dist = d.distance(x)
        # the zero-initialised denoiser is the identity: D(x) = x, so the distance is 0
        torch.testing.assert_close(dist, torch.zeros(4), atol=1e-5, rtol=0)
        _, flagged = d.detect(x)
        assert not flagged.any()  # D(x) = x: nothing to flag at a positive threshold
        torch.testing.assert_close(d.purify(x), x)
        g = torch.Generator().manual_seed(0)
        r = d.purify(x, rand=True, generator=g)
    assert r.shape == x.shape
    assert d.rand_min_size() == math.ceil(0.75 * 32)
    # zero padding: each image keeps at least one all-zero border row or column
    borders = torch.stack([r[:, :, 0].abs().sum((1, 2)), r[:, :, -1].abs().sum((1, 2)),
                           r[:, :, :, 0].abs().sum((1, 2)), r[:, :, :, -1].abs().sum((1, 2))], 1)
    assert (borders.min(1).values == 0).all()


class PooledDetector(nn.Module):
    """A detector whose embedding depends on the image (an untrained EfficientNet's does not):
    unit-norm linear features of a 4x4 average pool; the distance is Detector's definition."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4, 8)

    def embed(self, x):
        return nn.functional.normalize(self.lin(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)), dim=1)

    distance = Detector.distance


def test_detect_flags_exactly_the_images_above_the_threshold(parts):
    """A denoiser that moves each image by a different amount: with the threshold between the
    distances, ``detect`` flags exactly the images farther than it (not those at or below it),
    and its distances are the defence's own."""
    import copy

    den = copy.deepcopy(parts[0])
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = Defense(den.eval(), PooledDetector().eval(), threshold=0.0, rand_min_frac=0.75, image_size=32)
    x = torch.rand(6, 3, 32, 32, generator=g) * torch.linspace(0.2, 1.0, 6).view(6, 1, 1, 1)
    with torch.no_grad():
        dist = d.distance(x)
        assert dist.unique().numel() == 6 and (dist > 0).all()
        d.threshold = float(dist.sort().values[2])  # three at or below, three above
        got, flagged = d.detect(x)
    torch.testing.assert_close(got, dist)
    assert flagged.tolist() == (dist > d.threshold).tolist() and int(flagged.sum()) == 3
    assert not flagged[dist.argsort()[2]]  # the image exactly at the threshold passes


def test_threshold_on_synthetic_distances():
    from vars_fast.metrics import choose_threshold, detection_metrics

    g = torch.Generator().manual_seed(0)
    clean = 0.2 + 0.05 * torch.randn(500, generator=g)
    adv = 0.6 + 0.05 * torch.randn(500, generator=g)
    thr = choose_threshold(clean, adv, rule="youden")
    assert float(clean.max()) <= thr < float(adv.min())  # separable: the cut falls in the gap
    assert detection_metrics(clean, adv, thr)["accuracy"] == 1.0
    # overlapping: Youden's cut sits near the crossing point of two equal-variance Gaussians
    adv2 = 0.3 + 0.05 * torch.randn(500, generator=g)
    assert abs(choose_threshold(clean, adv2, rule="youden") - 0.25) < 0.03
    strict = choose_threshold(clean, adv2, rule="fpr@0.05")
    assert float((clean > strict).float().mean()) <= 0.05


def test_checkpoint_round_trip_weights_only(parts, tmp_path):
    den, det = parts
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.01 * torch.randn_like(p))
    split = {"train": [0, 1], "val": [2], "test": [3, 4]}
    d = Defense(den, det, threshold=0.37, rand_min_frac=0.8, image_size=32, backbone=BB, extra={"split": split})
    path = tmp_path / "defense.pt"
    save_defense(d, path, extra={"variant": "full"})
    raw = torch.load(path, weights_only=True)  # only plain containers and tensors inside
    assert raw["backbone"] == BB and raw["extra"]["split"] == split
    d2 = load_defense(path, device="cpu")
    assert d2.threshold == pytest.approx(0.37) and d2.rand_min_frac == pytest.approx(0.8) and d2.image_size == 32
    assert d2.split == split and d2.extra["variant"] == "full" and d2.backbone == BB
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(d2.purify(x), d.purify(x))
        torch.testing.assert_close(d2.distance(x), d.distance(x))
    # the no-detector ablation round-trips too, and says why it cannot detect
    save_defense(Defense(den, None, image_size=32, backbone=BB), tmp_path / "nodet.pt")
    d3 = load_defense(tmp_path / "nodet.pt")
    assert d3.detector is None and math.isnan(d3.threshold)
    with pytest.raises(RuntimeError, match="no detector"):
        d3.detect(x)
    with pytest.raises(ValueError, match="not a vars_fast defence"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        load_defense(tmp_path / "bad.pt")
