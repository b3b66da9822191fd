"""Per-catalogue model selection and the early-stopping guard (recommenders/selection.py, base.fit_bpr)."""
import logging

import pytest
import torch

from vars_fast.config import RecommenderConfig, SelectConfig, make_config
from vars_fast.data import Catalogue
from vars_fast.metrics import ranking_metrics
from vars_fast.recommenders import BPR, build_recommender, selection

pytestmark = pytest.mark.usefixtures("one_thread")


def long_tail_catalogue(n_users=160, n_clusters=4, per_cluster=10, shared=3, own=6, seed=0) -> Catalogue:
    """Users fall in ``n_clusters`` tastes; each buys ``shared`` items of its cluster's
    ``per_cluster`` and ``own`` items nobody else buys; the test item is another item of the
    user's cluster, ranked against items of the other clusters (as popular as it). A held-out
    training purchase is then mostly an item with no purchase left in the fold, which no model
    can rank (the holdout sits at chance), while the test rewards the cluster structure that
    takes the factors many epochs to learn."""
    g = torch.Generator().manual_seed(seed)
    n_shared = n_clusters * per_cluster
    n_items = n_shared + n_users * own
    train, test, negs = [], [], []
    for u in range(n_users):
        c = u % n_clusters
        mine = (c * per_cluster + torch.randperm(per_cluster, generator=g)[:shared + 1]).tolist()
        train += [(u, i) for i in mine[:shared]] + [(u, n_shared + u * own + k) for k in range(own)]
        test.append(mine[shared])
        others = torch.tensor([i for i in range(n_shared) if i // per_cluster != c])
        negs.append(others[torch.randperm(len(others), generator=g)])
    return Catalogue(n_users=n_users, n_items=n_items, train=torch.tensor(train), test=torch.tensor(test),
                     negatives=torch.stack(negs), images=torch.zeros(n_items, 3, 4, 4, dtype=torch.uint8),
                     status=["ok"] * n_items, item_ids=[str(i) for i in range(n_items)],
                     user_ids=[str(u) for u in range(n_users)], meta={"source": "generic"})


def rcfg(**kw):
    base = dict(k=8, epochs=30, batch_size=64, lr=0.003, lr_low=0.001, patience=2, val_negatives=30, threads=0,
                weight_decay=1e-3)
    return RecommenderConfig(**{**base, **kw})


def fit(cat, cfg, record=None):
    m = build_recommender("BPR", cat.n_users, cat.n_items, cfg, seed=0)
    m.fit(cat, cfg, torch.Generator().manual_seed(0), show_progress=False, log=logging.getLogger("t"),
          **({} if record is None else {"record": record}))
    return ranking_metrics(m, cat, topk=(10,))["HR@10"], m


def test_early_stopping_at_chance_falls_back_to_the_fixed_schedule(caplog):
    """The regression a real long-tail log showed: the holdout AUC peaks at chance in epoch 1-2
    and early stopping restores that untrained model, while the fixed schedule ranks the test
    far better. The guard must notice the holdout cannot rank and train the fixed schedule."""
    cat = long_tail_catalogue()
    fixed_hr, fixed = fit(cat, rcfg(early_stopping=False))
    with caplog.at_level(logging.WARNING):
        es_hr, m = fit(cat, rcfg(early_stopping=True))
    rec = m.fit_record
    assert not rec["informative"] and rec["best"] < rec["chance"] + 0.1  # the holdout is at chance
    assert rec.get("fallback") == "fixed schedule" and "fixed schedule" in caplog.text
    assert fixed_hr > 0.6  # the clusters, learnt over the epochs, rank most test items high
    assert es_hr == fixed_hr  # without the guard: 0.275 (the epoch-1 model) against 0.8375
    for k, v in fixed.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)


def test_early_stopping_restores_the_best_epoch_when_the_holdout_ranks():
    """Where the holdout is informative, nothing falls back: the best epoch is kept."""
    from test_recommenders import tiny_catalogue

    cat = tiny_catalogue(n_users=200, n_items=32)
    rec = {}
    _, m = fit(cat, rcfg(early_stopping=True, val_negatives=4, lr=0.05, patience=3), record=rec)
    assert rec["informative"] and "fallback" not in rec and rec["best"] == max(rec["val"])


def test_selection_is_on_for_files_and_off_for_synthetic():
    rc = RecommenderConfig()
    assert selection.enabled(rc, "generic") and selection.enabled(rc, "amazon") and selection.enabled(rc, "dvbpr_npy")
    assert not selection.enabled(rc, "synthetic")
    assert selection.enabled(RecommenderConfig(select=SelectConfig(mode="on")), "synthetic")
    assert not selection.enabled(RecommenderConfig(select=SelectConfig(mode="off")), "generic")
    # YAML reads a bare off as False: it still means off
    assert make_config("default", overrides={"recommender.select.mode": False}).recommender.select.mode == "off"


def test_coordinate_search_tries_every_dimension_around_the_best_and_is_bounded():
    rc = RecommenderConfig(lr=1e-2, weight_decay=3e-2, k=64, select=SelectConfig(
        lr=[1e-2, 3e-3, 1e-3], weight_decay=[1e-2, 3e-2, 1e-1], k=[16, 64], trials=6))
    # a score that prefers lr 1e-3, then weight_decay 1e-1, then k 16
    score = lambda c: -abs(c["lr"] - 1e-3) - abs(c["weight_decay"] - 0.1) - abs(c["k"] - 16) / 1e3  # noqa: E731
    tried = selection.coordinate_search(rc, score)
    assert tried[0] == {"lr": 1e-2, "weight_decay": 3e-2, "k": 64}  # the config's own first
    assert [c["lr"] for c in tried[:3]] == [1e-2, 3e-3, 1e-3]
    assert tried[3:5] == [{"lr": 1e-3, "weight_decay": 1e-2, "k": 64}, {"lr": 1e-3, "weight_decay": 0.1, "k": 64}]
    assert tried[5] == {"lr": 1e-3, "weight_decay": 0.1, "k": 16} and len(tried) == 6
    assert len(selection.coordinate_search(RecommenderConfig(select=SelectConfig(trials=2)), score)) == 2


def test_select_and_fit_picks_the_best_holdout_setting_and_retrains_on_all_pairs(caplog):
    """A grid where one learning rate is too small to learn in the epoch cap: selection must
    pick the other, log every trial, and retrain the winner on every training pair for its
    best epoch count (same weights as training that setting directly with that schedule)."""
    from test_recommenders import tiny_catalogue

    cat = tiny_catalogue(n_users=40, n_items=32)
    rc = rcfg(lr=1e-5, lr_low=1e-6, select=SelectConfig(lr=[1e-5, 0.05], weight_decay=[1e-3], k=[8], trials=2,
                                                          metric="auc"), val_negatives=4, patience=3, epochs=20)

    def build(rc_b):
        return build_recommender("BPR", cat.n_users, cat.n_items, rc_b, seed=0)

    with caplog.at_level(logging.INFO):
        m = selection.select_and_fit("BPR", build, cat, rc, torch.Generator().manual_seed(0), logging.getLogger("t"),
                                     show_progress=False)
    rep = m.selection
    assert [t["lr"] for t in rep["trials"]] == [1e-5, 0.05] and rep["chosen"]["lr"] == 0.05
    assert all(len(t["curve"]) >= t["best_epoch"] for t in rep["trials"])
    assert caplog.text.count("BPR select: lr") == 2 and "chose lr 0.05" in caplog.text
    assert m.reg_lambda == 1e-3 and isinstance(m, BPR)
    assert rep["chosen"]["val"] > rep["chance"]


def test_popularity_floor_is_reported(tmp_path):
    """A model below popularity gets a warning line and a meta entry (report.md repeats it)."""
    from vars_fast.recommenders.stage import below_popularity

    log = logging.getLogger("t")
    out = below_popularity("BPR", object(), 0.12, 0.17, log)
    assert out == [{"model": "BPR", "split": "test", "metric": "HR@10", "value": 0.12, "popularity": 0.17}]
    assert below_popularity("VBPR", object(), 0.30, 0.17, log) == []

    class Fitted:
        fit_record = {"best": 0.49, "popularity": 0.55, "metric": "auc"}

    val = below_popularity("BPR", Fitted(), 0.3, 0.17, log)
    assert val == [{"model": "BPR", "split": "validation", "metric": "auc", "value": 0.49, "popularity": 0.55}]


def test_longtail_preset_is_in_the_real_regime():
    """The longtail preset's split: median purchases per item <= 2, most test items with at most
    one training purchase, popularity above chance (the real catalogue's regime, issue #24)."""
    from vars_fast.data.catalogue import _build_split
    from vars_fast.data.interactions import split_stats

    cfg = make_config("longtail")
    sp = _build_split(cfg.data)
    s = split_stats(sp["train"], sp["test"], len(sp["user_ids"]), len(sp["item_ids"]))
    assert s["per_item_median"] <= 2 and s["test_le1"] > 0.5 and s["test_cold"] > 0.25
    assert s["items_without_train"] > 0 and 10000 < s["items"] < 20000
