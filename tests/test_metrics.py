"""Metrics against hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from vars_fast.metrics import (auc_score, choose_threshold, detection_metrics, hr_ndcg, prediction_shift,
                               ranking_metrics, roc_curve)


def test_hr_ndcg_hand_computed():
    pos = torch.tensor([5.0, 1.0, 3.0])
    neg = torch.tensor([[1.0, 2.0, 3.0, 4.0],    # rank 0: hit, ndcg 1
                        [2.0, 3.0, 4.0, 5.0],    # rank 4: miss at 2, hit at 5
                        [3.0, 0.0, 4.0, 0.0]])   # tie 3 == 3 counts against: rank 2
    m = hr_ndcg(pos, neg, topk=(1, 3, 5))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["HR@5"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(4)) / 3)


def test_constant_scorer_gets_nothing():
    m = hr_ndcg(torch.zeros(4), torch.zeros(4, 10), topk=(5, 10))
    assert m["HR@10"] == 0.0 and m["NDCG@10"] == 0.0


class _Rec:
    """score = user-specific item table; a visual override adds its first column."""
    uses_images = True
    device = torch.device("cpu")

    def __init__(self, table):
        self.table = table

    def score(self, users, items, visual=None):
        if items.dim() == 2:
            users = users[:, None].expand_as(items)
        s = self.table[users, items]
        return s if visual is None else s + visual[..., 0]


class _Cat:
    n_users = 2
    test = torch.tensor([0, 1])
    negatives = torch.tensor([[1, 2], [0, 2]])


def test_ranking_metrics_uses_test_negatives_and_visual_override():
    table = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 5.0]])  # user 0: rank 0; user 1: rank 1
    m = ranking_metrics(_Rec(table), _Cat(), topk=(1, 2))
    assert m["HR@1"] == 0.5 and m["HR@2"] == 1.0
    assert m["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    visual = torch.tensor([[0.0], [10.0], [0.0]])  # item 1 boosted: user 0 drops to rank 1, user 1 to rank 0
    m = ranking_metrics(_Rec(table), _Cat(), visual=visual, topk=(1,))
    assert m["HR@1"] == 0.5


def test_roc_auc_and_thresholds():
    clean = np.array([0.1, 0.2, 0.3, 0.4])
    adv = np.array([0.35, 0.5, 0.6, 0.7])
    fpr, tpr, thr = roc_curve(clean, adv)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(thr) < 0)
    # pairs with adv > clean: 15 of 16 (0.35 < 0.4)
    assert auc_score(clean, adv) == pytest.approx(15 / 16)
    assert np.trapezoid(tpr, fpr) == pytest.approx(15 / 16)
    t = choose_threshold(clean, adv, "youden")  # best: between 0.4 and 0.5 (tpr .75, fpr 0) or 0.3/0.35 (1, .25)
    d = detection_metrics(clean, adv, t)
    assert d["tpr"] - d["fpr"] == pytest.approx(0.75)
    t5 = choose_threshold(clean, adv, "fpr@0.05")
    assert 0.4 <= t5 < 0.5
    assert detection_metrics(clean, adv, t5)["fpr"] == 0.0
    tb = choose_threshold(clean, adv, "balanced")
    db = detection_metrics(clean, adv, tb)
    assert db["fpr"] == pytest.approx(1 - db["tpr"])
    with pytest.raises(ValueError, match="threshold_rule"):
        choose_threshold(clean, adv, "magic")


def test_detection_metrics_confusion():
    d = detection_metrics(torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.6, 0.3]), threshold=0.4)
    assert d["confusion"] == [[2, 1], [1, 1]]  # [[TN, FP], [FN, TP]]
    assert d["accuracy"] == pytest.approx(3 / 5)
    assert d["tpr"] == 0.5 and d["fpr"] == pytest.approx(1 / 3) and d["threshold"] == 0.4
    tie = detection_metrics([0.4], [0.4], threshold=0.4)  # "above" is strict: a tie is not flagged
    assert tie["confusion"] == [[1, 0], [1, 0]] and tie["auc"] == 0.5


def test_prediction_shift_eq13():
    before = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    after = torch.tensor([[2.0, 0.0], [5.0, 6.0]])
    # target 0: mean(1, 2) = 1.5; target 1: mean(0, 4) = 2; average 1.75
    assert prediction_shift(before, after) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        prediction_shift(before, after[:1])


# ---------------------------------------------------------------- image fidelity

from vars_fast.metrics import (TOO_WEAK, attack_damage, damage_recovered, fidelity_rows,  # noqa: E402
                               image_fidelity, psnr, psnr_per_image, recovery_status, ssim, ssim_per_image)


def _images(n=3, s=24, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_images_psnr_inf_ssim_one():
    x = _images()
    assert math.isinf(psnr(x, x)) and psnr(x, x) > 0
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    u8 = (x * 255).round().to(torch.uint8)
    assert math.isinf(psnr(u8, u8)) and ssim(u8, u8) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level():
    x = _images(2) * 0.5 + 0.25  # inside [0.25, 0.75]: the offsets below never leave [0, 1]
    # a constant offset a: MSE = a^2 exactly
    a = 0.05
    assert psnr(x, x + a) == pytest.approx(10 * math.log10(1 / a ** 2), abs=1e-9)
    # +-a with random signs: every squared error is a^2, MSE = a^2 again
    sign = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0).double()
    assert psnr(x, x + 0.1 * sign) == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)
    # per image, then averaged: offsets 0.1 and 0.01 give 20 dB and 40 dB -> mean 30 dB
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    assert psnr_per_image(x, y).tolist() == pytest.approx([20.0, 40.0], abs=1e-9)
    assert psnr(x, y) == pytest.approx(30.0, abs=1e-9)


def test_psnr_uint8_matches_float():
    x = (_images(2) * 255).round().to(torch.uint8)
    y = x.clone()
    y[..., 0, 0] = y[..., 0, 0] ^ 1  # flip the lowest bit of one pixel per channel
    assert psnr(x, y) == pytest.approx(psnr(x.double() / 255, y.double() / 255), abs=1e-12)


def _ssim_direct(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, size: int = 11) -> float:
    """SSIM written straight from Wang et al. 2004, Eq. 13-16, one window position at a time."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                pa, pb = a[ch, i:i + size, j:j + size], b[ch, i:i + size, j:j + size]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_direct_formula():
    x = _images(2, s=14, seed=2)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    got = ssim_per_image(x, y)
    want = [_ssim_direct(x[k].double().numpy(), y[k].double().numpy()) for k in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-10)
    assert 0.0 < float(got.mean()) < 1.0


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    x = _images(3, s=32, seed=4)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    want = [skm.structural_similarity(x[k].double().numpy(), y[k].double().numpy(), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0)
            for k in range(3)]
    assert ssim_per_image(x, y).tolist() == pytest.approx(want, abs=1e-8)
    assert psnr_per_image(x, y).tolist() == pytest.approx(
        [skm.peak_signal_noise_ratio(x[k].numpy(), y[k].numpy(), data_range=1.0) for k in range(3)], abs=1e-5)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_fidelity_rows():
    x = (_images(5, s=16, seed=6) * 0.5 + 0.25)
    den_c = x + 0.01
    adv = x + 0.1
    den_adv = x + 0.001
    rows = fidelity_rows(x, den_c, {("pgd", 8): (adv, den_adv)}, items=[0, 2, 4])
    by = {(r["attack"], r["eps"], r["images"]): r for r in rows}
    assert set(by) == {("clean", 0, "denoised"), ("pgd", 8, "attacked"), ("pgd", 8, "denoised")}
    assert by["clean", 0, "denoised"]["psnr"] == pytest.approx(40.0)
    assert by["pgd", 8, "attacked"]["psnr"] == pytest.approx(20.0)
    assert by["pgd", 8, "denoised"]["psnr"] == pytest.approx(60.0)
    assert all(r["n"] == 3 and r["model"] == "VBPR" for r in rows)
    assert by["pgd", 8, "denoised"]["ssim"] > by["pgd", 8, "attacked"]["ssim"]
    # batching does not change the result
    assert image_fidelity(x, adv, batch_size=2) == pytest.approx(image_fidelity(x, adv))


# ---------------------------------------------------------------- recovery of the damage

def test_damage_recovered_formula():
    assert damage_recovered(0.4, 0.1, 0.4) == pytest.approx(1.0)
    assert damage_recovered(0.4, 0.1, 0.1) == pytest.approx(0.0)
    assert damage_recovered(0.4, 0.1, 0.31) == pytest.approx(0.7)
    assert damage_recovered(0.4, 0.2, 0.1) == pytest.approx(-0.5)  # worse than undefended
    assert damage_recovered(0.4, 0.4, 0.3) is None  # no damage: undefined
    assert attack_damage(0.4, 0.1) == pytest.approx(0.75)
    assert attack_damage(0.0, 0.0) is None


def test_too_weak_rule():
    # the quick-preset case: FGSM 0.295 -> 0.235 (20% damage) and OURS 0.245: 17% recovered
    assert damage_recovered(0.295, 0.235, 0.245) == pytest.approx(1 / 6)
    assert recovery_status(0.295, 0.235, 0.245, need=0.7).startswith("missed by")
    # 2% damage: too weak, even if the defended HR happens to be high or low
    assert recovery_status(0.40, 0.392, 0.40, need=0.7) == TOO_WEAK
    assert recovery_status(0.40, 0.392, 0.30, need=0.7) == TOO_WEAK
    # the boundary: exactly 10% damage is judged
    assert recovery_status(0.40, 0.36, 0.39, need=0.7) == "met"
    assert recovery_status(0.40, 0.41, 0.40, need=0.7) == TOO_WEAK  # the attack helped
