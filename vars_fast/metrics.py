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


def choose_threshold(d_clean, d_adv, rule: str = "youden") -> float:
    """Threshold on held-out distances. Rules:

    * ``youden``   max TPR - FPR (= max balanced accuracy);
    * ``fpr@0.05`` max TPR subject to FPR <= 0.05 (flag at most 5% of clean inputs);
    * ``balanced`` equal error rate: FPR closest to the miss rate 1 - TPR.
    Ties go to the larger threshold (fewer false alarms).
    """
    fpr, tpr, thr = roc_curve(d_clean, d_adv)
    if rule == "youden":
        k = int(np.argmax(tpr - fpr))
    elif rule.startswith("fpr@"):
        limit = float(rule[4:])
        ok = np.flatnonzero(fpr <= limit + 1e-12)
        k = int(ok[np.argmax(tpr[ok])])
    elif rule == "balanced":
        k = int(np.argmin(np.abs(fpr - (1 - tpr))))
    else:
        raise ValueError(f"defense.threshold_rule: unknown rule {rule!r} (youden | fpr@0.05 | balanced)")
    return float(thr[k])


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
