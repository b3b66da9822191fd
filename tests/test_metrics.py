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
