"""Evaluation metrics: ranking (HR/NDCG@N over sampled candidates), detection, prediction shift.

Ranking follows the paper's protocol: each test user's held-out item is ranked against the
user's stored sampled negatives (100 by default). The 0-based rank of the positive is the
number of negatives scoring >= it, so ties count against the positive (a constant scorer
gets HR = 0, not a lucky 1). HR@N = [rank < N]; NDCG@N = [rank < N] / log2(rank + 2).

Detection treats "adversarial" as the positive class and flags an input when its distance
is strictly above the threshold.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from vars_fast.registry import THRESHOLD_RULES


def hr_ndcg(pos_scores: Tensor, neg_scores: Tensor, topk: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """pos_scores [U], neg_scores [U, C] -> {"HR@N", "NDCG@N"} averaged over users."""
    pos, neg = torch.as_tensor(pos_scores).float(), torch.as_tensor(neg_scores).float()
    rank = (neg >= pos[:, None]).sum(1).double()  # 0-based; ties against the positive
    out: dict[str, float] = {}
    for n in topk:
        hit = rank < n
        out[f"HR@{n}"] = float(hit.double().mean())
        out[f"NDCG@{n}"] = float(torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank)).mean())
    return out


@torch.no_grad()
def ranking_metrics(rec, cat, visual: Optional[Tensor] = None, topk: Sequence[int] = (5, 10, 20),
                    chunk_users: int = 1024) -> dict[str, float]:
    """HR/NDCG of ``rec`` on ``cat``'s leave-one-out test items against ``cat.negatives``.

    ``visual``: an [N, F] override of the items' visual representation (e.g. features of an
    attacked or denoised catalogue); None uses the model's clean ``item_visual``.
    """
    device = rec.device
    test, negs = cat.test.to(device), cat.negatives.to(device)
    users = torch.arange(test.shape[0], device=device)
    keep = test >= 0  # a user without a test item (if a loader allows it) is skipped
    users, test, negs = users[keep], test[keep], negs[keep]
    if visual is not None:
        visual = visual.to(device, torch.float32)
    score = getattr(rec, "score_catalogue", None)
    if score is None:  # a bare model with only the contract's score(users, items, visual)
        score = lambda u, it, v: rec.score(u, it, None if v is None else v[it])  # noqa: E731
    pos_all, neg_all = [], []
    for s in range(0, users.shape[0], chunk_users):
        u = users[s:s + chunk_users]
        pos_all.append(score(u, test[s:s + chunk_users], visual).float().cpu())
        neg_all.append(score(u, negs[s:s + chunk_users], visual).float().cpu())
    return hr_ndcg(torch.cat(pos_all), torch.cat(neg_all), topk)


# ---------------------------------------------------------------- detection


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def roc_curve(d_clean, d_adv) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "adversarial if d > t" -> (fpr, tpr, thresholds), thresholds decreasing.

    The thresholds are the largest score (nothing flagged), the midpoints between consecutive
    distinct scores, and just below the smallest score (everything flagged).
    """
    c, a = _np(d_clean), _np(d_adv)
    u = np.unique(np.concatenate([c, a]))
    thr = np.concatenate([[u[-1]], ((u[:-1] + u[1:]) / 2)[::-1], [np.nextafter(u[0], -np.inf)]])
    fpr = (c[None, :] > thr[:, None]).mean(1) if c.size else np.zeros_like(thr)
    tpr = (a[None, :] > thr[:, None]).mean(1) if a.size else np.zeros_like(thr)
    return fpr, tpr, thr


def auc_score(d_clean, d_adv) -> float:
    """P(d_adv > d_clean) + 0.5 P(tie) (the area under the ROC curve, Mann-Whitney form)."""
    c, a = _np(d_clean), _np(d_adv)
    if c.size == 0 or a.size == 0:
        return float("nan")
    cs = np.sort(c)
    below = np.searchsorted(cs, a, side="left")
    ties = np.searchsorted(cs, a, side="right") - below
    return float((below + 0.5 * ties).sum() / (c.size * a.size))


# The rules (``THRESHOLD_RULES``, ``defense.threshold_rule``): ``(fpr, tpr) -> index`` of the
# chosen ROC point; ``roc_curve`` orders thresholds decreasing, so argmax/argmin ties go to the
# larger threshold (fewer false alarms).

@THRESHOLD_RULES.register("youden")
def youden_rule(fpr: np.ndarray, tpr: np.ndarray) -> int:
    """max TPR - FPR (= max balanced accuracy)."""
    return int(np.argmax(tpr - fpr))


def fpr_rule(limit: float):
    """max TPR subject to FPR <= ``limit`` (flag at most that share of clean inputs)."""
    def rule(fpr: np.ndarray, tpr: np.ndarray) -> int:
        ok = np.flatnonzero(fpr <= limit + 1e-12)
        return int(ok[np.argmax(tpr[ok])])

    return rule


THRESHOLD_RULES.register("fpr@0.05", fpr_rule(0.05))


@THRESHOLD_RULES.register("balanced")
def balanced_rule(fpr: np.ndarray, tpr: np.ndarray) -> int:
    """equal error rate: FPR closest to the miss rate 1 - TPR."""
    return int(np.argmin(np.abs(fpr - (1 - tpr))))


def choose_threshold(d_clean, d_adv, rule: str = "youden") -> float:
    """Threshold on held-out distances by a member of ``THRESHOLD_RULES`` (youden, fpr@0.05,
    balanced; any ``fpr@<limit>`` also works). Ties go to the larger threshold."""
    fpr, tpr, thr = roc_curve(d_clean, d_adv)
    if rule not in THRESHOLD_RULES and rule.startswith("fpr@"):
        pick = fpr_rule(float(rule[4:]))
    else:
        pick = THRESHOLD_RULES[rule]  # ConfigError naming defense.threshold_rule
    return float(thr[pick(fpr, tpr)])


def detection_metrics(d_clean, d_adv, threshold: float) -> dict:
    """Accuracy / TPR / FPR of "d > threshold", the AUC, and the confusion matrix
    ``[[TN, FP], [FN, TP]]`` (rows: true clean, adversarial; columns: predicted)."""
    c, a = _np(d_clean), _np(d_adv)
    fp, tp = int((c > threshold).sum()), int((a > threshold).sum())
    tn, fn = c.size - fp, a.size - tp
    n = max(c.size + a.size, 1)
    return {
        "accuracy": (tn + tp) / n,
        "auc": auc_score(c, a),
        "tpr": tp / a.size if a.size else float("nan"),
        "fpr": fp / c.size if c.size else float("nan"),
        "threshold": float(threshold),
        "confusion": [[tn, fp], [fn, tp]],
    }


# ---------------------------------------------------------------- targeted attacks


def prediction_shift(before: Tensor, after: Tensor) -> float:
    """Eq. 13: Δ_i = mean_u (ŷ'_ui - ŷ_ui) per target item i, averaged over targets.

    before, after: [U, T] scores of every user for each target item.
    """
    before, after = torch.as_tensor(before).double(), torch.as_tensor(after).double()
    if before.shape != after.shape:
        raise ValueError(f"prediction_shift: shapes differ {tuple(before.shape)} vs {tuple(after.shape)}")
    return float((after - before).mean(0).mean())


# ---------------------------------------------------------------- image fidelity
#
# Both metrics take images in [0, 1] (uint8 images are divided by 255), [B,3,H,W] or [3,H,W],
# are computed per image and then averaged over the images.
#
# PSNR = 10 log10(1 / MSE), the MSE over every pixel and channel of one image (peak 1). An
# image identical to its reference has PSNR +inf, and so has the mean over images that holds one.
#
# SSIM is Wang et al. 2004 ("Image quality assessment: from error visibility to structural
# similarity", Sec. III-B): an 11x11 Gaussian window with sigma 1.5 (normalised to sum 1),
# K1 = 0.01, K2 = 0.03, dynamic range L = 1, so C1 = (0.01)^2 and C2 = (0.03)^2; weighted
# local means, variances and covariance (population form, no N/(N-1) factor). The SSIM map is
# taken over the "valid" positions only (windows entirely inside the image, no padding), and
# averaged over those positions and the three channels. This equals scikit-image's
# ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
# data_range=1, channel_axis=0)``; tests/test_metrics.py checks it against that when installed.

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit_images(x) -> Tensor:
    """uint8 or float images -> float64 [B,C,H,W] in [0,1] (double: PSNR of nearly identical
    images and the SSIM variances are differences of close numbers)."""
    x = torch.as_tensor(x)
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    return x.unsqueeze(0) if x.dim() == 3 else x


def _pair(ref, img) -> tuple[Tensor, Tensor]:
    a, b = _unit_images(ref), _unit_images(img).to(_unit_images(ref).device)
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"fidelity: image shapes differ or are not [B,C,H,W]: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr_per_image(ref, img) -> Tensor:
    """[B] PSNR in dB of each image against its reference (peak 1; +inf where identical)."""
    a, b = _pair(ref, img)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)  # mse 0 -> +inf


def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_per_image(ref, img) -> Tensor:
    """[B] SSIM of each image against its reference (Wang et al. 2004; constants above)."""
    a, b = _pair(ref, img)
    B, C, H, W = a.shape
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} (the window), got {H}x{W}")
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, a.dtype, a.device)
    wx, wy = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1), g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, valid positions only, per channel
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, wx, groups=C), wy, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(ref, img) -> float:
    """Mean over images of the per-image PSNR (dB)."""
    return float(psnr_per_image(ref, img).mean())


def ssim(ref, img) -> float:
    """Mean over images of the per-image SSIM."""
    return float(ssim_per_image(ref, img).mean())


def image_fidelity(ref, img, batch_size: int = 256) -> dict:
    """{"psnr", "ssim", "n"} of ``img`` against ``ref`` ([N,3,H,W] each, uint8 or [0,1] float),
    in batches so that a whole catalogue fits in memory."""
    n = int(torch.as_tensor(ref).shape[0])
    p, s = [], []
    for k in range(0, n, batch_size):
        p.append(psnr_per_image(ref[k:k + batch_size], img[k:k + batch_size]))
        s.append(ssim_per_image(ref[k:k + batch_size], img[k:k + batch_size]))
    return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean()), "n": n}


def fidelity_rows(clean, denoised_clean, attacked: dict, items=None, model: str = "VBPR",
                  batch_size: int = 256) -> list[dict]:
    """The ``fidelity`` rows of metrics.json: how far each image set is from the clean images.

    ``clean``, ``denoised_clean``: [N,3,H,W] (uint8 or [0,1] float) of the whole catalogue;
    ``attacked``: {(attack, eps): (x_adv, D(x_adv))}, same shapes; ``items``: the item indices
    to measure (e.g. the held-out test items; None: all). One row per image set::

        {"model", "attack": "clean", "eps": 0, "images": "denoised", "psnr", "ssim", "n"}  # D(x) vs x
        {"model", "attack", "eps", "images": "attacked", ...}   # x_adv vs x: the reference
        {"model", "attack", "eps", "images": "denoised", ...}   # D(x_adv) vs x

    ``model`` names the recommender the images were attacked against.
    """
    sel = (lambda t: t) if items is None else (lambda t: t[torch.as_tensor(items, dtype=torch.long)])  # noqa: E731
    x = sel(clean)
    rows = [{"model": model, "attack": "clean", "eps": 0, "images": "denoised",
             **image_fidelity(x, sel(denoised_clean), batch_size)}]
    for (attack, eps), (adv, den) in attacked.items():
        for name, imgs in (("attacked", adv), ("denoised", den)):
            rows.append({"model": model, "attack": attack, "eps": eps, "images": name,
                         **image_fidelity(x, sel(imgs), batch_size)})
    return rows


# ---------------------------------------------------------------- recovery of the damage

# An attack that costs less than this share of clean HR cannot show whether a defence recovers
# anything: the damage is within the noise of the metric, and any ratio over it is meaningless.
TOO_WEAK_DAMAGE = 0.10
TOO_WEAK = "attack too weak to judge"


def attack_damage(hr_clean: float, hr_attacked: float) -> Optional[float]:
    """The attack's damage relative to clean: (HR_clean - HR_attacked) / HR_clean (None if HR_clean is 0)."""
    if hr_clean is None or hr_attacked is None or not hr_clean:
        return None
    return (hr_clean - hr_attacked) / hr_clean


def damage_recovered(hr_clean: float, hr_attacked: float, hr_defended_attacked: float) -> Optional[float]:
    """Share of the attack's damage that the defence recovers:
    (HR_def_att - HR_att) / (HR_clean - HR_att). 1: back to clean; 0: no better than
    undefended; negative: worse; above 1: better than clean. None when the attack did no
    damage (HR_att >= HR_clean), where the share is undefined."""
    if None in (hr_clean, hr_attacked, hr_defended_attacked) or hr_clean <= hr_attacked:
        return None
    return (hr_defended_attacked - hr_attacked) / (hr_clean - hr_attacked)


def recovery_status(hr_clean: float, hr_attacked: float, hr_defended_attacked: float, need: float) -> str:
    """"met", "missed by X" or, when the attack's damage is under ``TOO_WEAK_DAMAGE`` of
    clean, "attack too weak to judge" (whatever the defended HR is)."""
    dmg = attack_damage(hr_clean, hr_attacked)
    if dmg is None or dmg < TOO_WEAK_DAMAGE:
        return TOO_WEAK
    rec = damage_recovered(hr_clean, hr_attacked, hr_defended_attacked)
    if rec is None:
        return "n/a"
    return "met" if rec >= need else f"missed by {need - rec:.4f}"
