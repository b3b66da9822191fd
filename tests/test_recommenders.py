"""Recommenders: score formulas, BPR training, AMR perturbation, DVBPR gradients, checkpoints, stage."""
import logging
import math

import pytest
import torch

from vars_fast.config import AMRConfig, Config, DVBPRConfig, RecommenderConfig
from vars_fast.data import Catalogue
from vars_fast.recommenders import (AMR, BPR, DVBPR, VBPR, Pop, bpr_loss, build_recommender, encode_catalogue,
                                    load_recommender, save_recommender)

pytestmark = pytest.mark.usefixtures("one_thread")


FDIM = 6


def tiny_catalogue(n_users=12, n_items=16, size=16, seed=0) -> Catalogue:
    """Users like one of two item colours; images show the colour (visual signal is real)."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.arange(n_items) % 2
    img = torch.rand(n_items, 3, size, size, generator=g) * 0.3
    img[:, 0] += 0.7 * (colour == 0).float()[:, None, None]
    img[:, 2] += 0.7 * (colour == 1).float()[:, None, None]
    images = (img.clamp(0, 1) * 255).to(torch.uint8)
    train, test, negs = [], [], []
    for u in range(n_users):
        liked = torch.nonzero(colour == u % 2).flatten()
        liked = liked[torch.randperm(len(liked), generator=g)]
        test.append(int(liked[0]))
        train += [(u, int(i)) for i in liked[1:5]]
        negs.append(torch.nonzero(colour != u % 2).flatten()[:4])
    return Catalogue(n_users=n_users, n_items=n_items, train=torch.tensor(train), test=torch.tensor(test),
                     negatives=torch.stack(negs), images=images, status=["ok"] * n_items,
                     item_ids=[str(i) for i in range(n_items)], user_ids=[str(u) for u in range(n_users)])


class LinearBackbone(torch.nn.Module):
    """Stand-in backbone: mean colour + a fixed linear map, differentiable, frozen."""
    name, feature_dim = "linear", FDIM

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, FDIM, generator=torch.Generator().manual_seed(1)),
                                    requires_grad=False)

    def features(self, x):
        return x.mean(dim=(2, 3)) @ self.w


@pytest.fixture(scope="module")
def cat():
    return tiny_catalogue()


@pytest.fixture(scope="module")
def bb():
    return LinearBackbone()


def rcfg(dvbpr=None, **kw):
    base = dict(k=4, visual_k=3, epochs=6, batch_size=16, lr=0.05, lr_low=0.01, amr=AMRConfig(epochs=1), threads=0,
                dvbpr=DVBPRConfig(**{"epochs": 1, "cnn": "small", "cnn_width": 4, **(dvbpr or {})}))
    return RecommenderConfig(**{**base, **kw})


def test_vbpr_score_matches_hand_computation():
    m = VBPR(2, 3, feature_dim=2, k=2, biases=True, feature_norm="none")
    with torch.no_grad():
        m.P.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
        m.Q.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.0, 1.0]]))
        m.E.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        m.beta_item.copy_(torch.tensor([0.5, -0.5, 0.0]))
        m.beta_visual.copy_(torch.tensor([1.0, 1.0]))
    f = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.5]])
    m.set_item_visual(f)
    m.fit_feature_norm(f)  # "none": identity
    # u=0, i=1: p=(1,2), q+Ef = (0.3+2, 0.4+0) -> 2.3 + 0.8 = 3.1; + beta -0.5 + beta'.f 2 = 4.6
    # u=1, i=2: p=(.5,-1), q+Ef = (0, 1+1) -> -2; + 0 + 0.5 = -1.5
    s = m.score(torch.tensor([0, 1]), torch.tensor([1, 2]))
    torch.testing.assert_close(s, torch.tensor([4.6, -1.5]))
    # candidate lists [B, C] and explicit visual give the same numbers
    sc = m.score(torch.tensor([0, 1]), torch.tensor([[1, 1], [2, 2]]))
    torch.testing.assert_close(sc, torch.tensor([[4.6, 4.6], [-1.5, -1.5]]))
    torch.testing.assert_close(m.score(torch.tensor([0]), torch.tensor([1]), visual=f[[1]]), s[:1])
    torch.testing.assert_close(m.score_catalogue(torch.tensor([0, 1]), torch.tensor([[1, 2]] * 2)),
                               m.score(torch.tensor([0, 1]), torch.tensor([[1, 2]] * 2)))


def test_vbpr_untied_and_feature_normalisation():
    m = VBPR(1, 1, feature_dim=2, k=1, visual_k=1, tied=False, biases=False)
    with torch.no_grad():
        m.P.copy_(torch.tensor([[2.0, 3.0]]))  # [gamma_u; theta_u]
        m.Q.fill_(0.5)
        m.E.copy_(torch.tensor([[1.0, 1.0]]))
    f = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    m.fit_feature_norm(f)  # mean (2, 4); centred rows (-1,-1), (1,1): mean norm sqrt(2)
    torch.testing.assert_close(m.transform(f), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2))
    s = m.score(torch.tensor([0]), torch.tensor([0]), visual=f[[1]])
    torch.testing.assert_close(s, torch.tensor([2 * 0.5 + 3 * 2 / math.sqrt(2)]))


def test_bpr_loss_hand_computation():
    m = BPR(1, 2, k=1, biases=False)
    with torch.no_grad():
        m.P.fill_(1.0)
        m.Q.copy_(torch.tensor([[2.0], [0.5]]))
    loss = bpr_loss(m, torch.tensor([[0, 0, 1]]))
    assert float(loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))


@pytest.mark.parametrize("tied,biases", [(True, True), (False, True), (True, False)])
def test_training_loss_equals_its_definition(tied, biases):
    """``loss`` gathers each table once and normalises after the projection; it must equal
    Eq. 2 written out with ``score`` (per-triple features through ``transform``) plus ``reg``,
    in value and in every gradient, and ``score_catalogue`` must equal ``score``."""
    g = torch.Generator().manual_seed(0)
    for m in (VBPR(7, 11, 5, k=4, visual_k=3, tied=tied, biases=biases, reg=0.03), BPR(7, 11, k=4, biases=biases, reg=0.03)):
        with torch.no_grad():
            for prm in m.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        if isinstance(m, VBPR):
            m.set_item_visual(torch.rand(11, 5, generator=g) * 3)
            m.fit_feature_norm(m.item_visual)
        triples = torch.stack([torch.randint(0, 7, (40,), generator=g), torch.randint(0, 11, (40,), generator=g),
                               torch.randint(0, 11, (40,), generator=g)], 1)
        fast, ref = m.loss(triples), bpr_loss(m, triples) + m.reg(triples)
        torch.testing.assert_close(fast, ref)
        for a, b in zip(torch.autograd.grad(fast, list(m.parameters())), torch.autograd.grad(ref, list(m.parameters()))):
            torch.testing.assert_close(a, b)
        users, cand = torch.arange(7), torch.randint(0, 11, (7, 6), generator=g)
        torch.testing.assert_close(m.score_catalogue(users, cand), m.score(users, cand))


@pytest.mark.parametrize("name", ["BPR", "VBPR"])
def test_training_lowers_loss_and_is_deterministic(cat, bb, name):
    feats = encode_catalogue(VBPR(1, 1, FDIM, backbone=bb), cat.images, progress=False) if name == "VBPR" else None
    runs = []
    for _ in range(2):
        m = build_recommender(name, cat.n_users, cat.n_items, rcfg(), backbone=bb, seed=3)
        kw = {"features": feats} if feats is not None else {}
        hist = m.fit(cat, rcfg(), torch.Generator().manual_seed(0), show_progress=False, **kw)
        runs.append((hist, m.state_dict()))
    hist = runs[0][0]
    assert hist[-1] < hist[0] < math.log(2) + 0.05
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        torch.testing.assert_close(v, runs[1][1][k])


def test_vbpr_learns_the_visual_signal(cat, bb):
    feats = encode_catalogue(VBPR(1, 1, FDIM, backbone=bb), cat.images, progress=False)
    m = build_recommender("VBPR", cat.n_users, cat.n_items, rcfg(epochs=30), backbone=bb, seed=0)
    m.fit(cat, rcfg(epochs=30), torch.Generator().manual_seed(0), show_progress=False, features=feats)
    from vars_fast.metrics import ranking_metrics
    assert ranking_metrics(m, cat, topk=(1,))["HR@1"] > 0.9  # test item vs the other colour's items


def test_amr_perturbation_has_norm_eps(cat, bb):
    v = build_recommender("VBPR", cat.n_users, cat.n_items, rcfg(), backbone=bb, seed=0)
    feats = encode_catalogue(v, cat.images, progress=False)
    v.fit(cat, rcfg(epochs=2), torch.Generator().manual_seed(0), show_progress=False, features=feats)
    amr = AMR.from_vbpr(v, amr_eps=0.3, amr_lambda=1.0)
    torch.testing.assert_close(amr.score(torch.tensor([0, 1]), torch.tensor([2, 3])),
                               v.score(torch.tensor([0, 1]), torch.tensor([2, 3])))
    triples = cat.sample_triples(10, torch.Generator().manual_seed(0))
    fi, fj, di, dj = amr.perturbation(triples)
    torch.testing.assert_close(di.norm(dim=1), torch.full((10,), 0.3))
    torch.testing.assert_close(dj.norm(dim=1), torch.full((10,), 0.3))
    # the perturbation is the worst case to first order: the pair loss goes up
    assert amr._pair_loss(triples, fi + di, fj + dj) > amr._pair_loss(triples, fi, fj)
    hist = amr.fit(cat, rcfg(), torch.Generator().manual_seed(0), show_progress=False)
    assert len(hist) == 1 and math.isfinite(hist[0])


def test_encode_is_differentiable_in_images(cat, bb):
    x = cat.item_batch(torch.arange(4)).requires_grad_(True)
    for m in (VBPR(cat.n_users, cat.n_items, FDIM, backbone=bb), DVBPR(cat.n_users, cat.n_items, k=4, width=4)):
        m.eval().requires_grad_(False)
        s = m.score(torch.arange(4), torch.arange(4), visual=m.encode(x)).sum()
        (g,) = torch.autograd.grad(s, x)
        assert g.abs().sum() > 0


def test_dvbpr_trains_end_to_end(cat):
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, rcfg(), seed=0)
    before = [p.clone() for p in m.cnn.parameters()]
    hist = m.fit(cat, rcfg(dvbpr={"epochs": 2}), torch.Generator().manual_seed(0), show_progress=False)
    assert len(hist) == 2 and all(math.isfinite(h) for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.cnn.parameters()))  # the CNN is trained
    assert m.item_visual.shape == (cat.n_items, 4)
    torch.testing.assert_close(m.item_visual[:3], m.encode(cat.item_batch(torch.arange(3))).detach())


def test_pop_counts(cat):
    m = Pop(cat.n_users, cat.n_items)
    m.fit(cat)
    counts = torch.bincount(cat.train[:, 1], minlength=cat.n_items).float()
    torch.testing.assert_close(m.score(torch.tensor([0, 5]), torch.tensor([[0, 1], [2, 3]])),
                               counts[torch.tensor([[0, 1], [2, 3]])])


@pytest.mark.parametrize("name", ["VBPR", "AMR", "DVBPR", "BPR", "Pop"])
def test_checkpoint_round_trip_weights_only(tmp_path, cat, bb, name):
    m = build_recommender(name, cat.n_users, cat.n_items, rcfg(), backbone=bb, seed=0)
    if m.uses_images:
        feats = encode_catalogue(m, cat.images, progress=False)
        m.set_item_visual(feats)
        if name != "DVBPR":
            m.fit_feature_norm(feats)
    if name == "Pop":
        m.fit(cat)
    path = tmp_path / f"{name}.pt"
    save_recommender(m, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"name", "kwargs", "state_dict", "item_visual"}
    assert not any(k.startswith("backbone") for k in raw["state_dict"])  # shared backbone never saved
    back = load_recommender(path, backbone=bb)
    assert type(back) is type(m) and not back.training
    assert not any(p.requires_grad for p in back.parameters())
    u, it = torch.arange(5), torch.arange(5)
    torch.testing.assert_close(back.score(u, it), m.eval().score(u, it))
    if name in ("VBPR", "AMR"):
        assert back.backbone is bb and not any(p is bb.w for p in back.parameters())


def test_stage_writes_rows_checkpoints_and_meta(tmp_path, cat, bb):
    from vars_fast.pipeline import Context
    from vars_fast.recommenders.stage import run_stage
    from vars_fast.run import RunFolder

    cfg = Config()
    cfg.recommender = rcfg(epochs=2)
    cfg.run.progress = False
    ctx = Context(cfg, RunFolder(tmp_path / "run"), torch.device("cpu"), logging.getLogger("test"))
    ctx.put("catalogue", cat)
    ctx.put("backbone", bb)
    run_stage(ctx)
    rows = ctx.run.rows("ranking", attack="clean")
    assert sorted(r["model"] for r in rows) == sorted(cfg.recommender.models)
    for r in rows:
        assert r["defense"] == "none" and r["eps"] == 0
        assert all(0 <= r[f"{m}@{n}"] <= 1 for m in ("HR", "NDCG") for n in (5, 10, 20))
    for name in cfg.recommender.models:
        assert ctx.run.checkpoint(f"recommender_{name}").is_file()
    assert ctx.run.checkpoint(f"features_{cfg.backbone.name}").is_file()
    meta = ctx.run.load_metrics()["meta"]
    assert "train_VBPR_s" in meta["timings"]
    # a re-run reuses the cached features and replaces (not duplicates) the rows
    run_stage(ctx)
    assert len(ctx.run.rows("ranking", attack="clean")) == len(rows)


def test_checkpoint_refuses_another_data_split(tmp_path, cat, bb):
    m = build_recommender("BPR", cat.n_users, cat.n_items, rcfg(), backbone=bb, seed=0)
    path = tmp_path / "BPR.pt"
    save_recommender(m, path, split_key="aaaa")
    load_recommender(path, split_key="aaaa")  # same split: fine
    with pytest.raises(ValueError, match="split"):
        load_recommender(path, split_key="bbbb")


class TrainingOnlyCatalogue:
    """A catalogue whose test split cannot be read: training must not touch it."""

    def __init__(self, cat):
        self._cat = cat

    def __getattr__(self, name):
        if name in ("test", "negatives"):
            raise AssertionError(f"training read cat.{name} (the test split)")
        return getattr(self._cat, name)


@pytest.mark.parametrize("name", ["BPR", "VBPR"])
def test_early_stopping_uses_only_training_interactions(cat, bb, name):
    """No split leakage: early stopping never reads the test split, so the trained model is
    the same whatever the test items and their negatives are."""
    import dataclasses

    feats = encode_catalogue(VBPR(1, 1, FDIM, backbone=bb), cat.images, progress=False)
    kw = {"features": feats} if name == "VBPR" else {}
    cfg = rcfg(early_stopping=True, patience=1, epochs=10)
    other = dataclasses.replace(cat, test=cat.test.flip(0), negatives=cat.negatives.roll(1, dims=0))
    states = []
    for c in (TrainingOnlyCatalogue(cat), other):
        m = build_recommender(name, cat.n_users, cat.n_items, cfg, backbone=bb, seed=0)
        m.fit(c, cfg, torch.Generator().manual_seed(0), show_progress=False, **kw)
        states.append(m.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(v, states[1][k], rtol=0, atol=0)


def test_holdout_is_carved_from_training_pairs(cat):
    from vars_fast.recommenders.base import holdout_split

    fold, val = holdout_split(TrainingOnlyCatalogue(cat), 5, torch.Generator().manual_seed(0))
    train = {tuple(p) for p in cat.train.tolist()}
    held = list(zip(val.users.tolist(), val.items.tolist()))
    assert len(held) == cat.n_users == len(set(val.users.tolist()))  # one per user (each has 4 here)
    assert set(held) <= train and not set(held) & {tuple(p) for p in fold.train.tolist()}
    assert len(fold.train) + len(held) == len(cat.train)
    assert not cat.is_train_positive(val.users[:, None].expand_as(val.negatives), val.negatives).any()
    # held-out items are never sampled as negatives of their user while training on the fold
    t = fold.sample_triples(4000, torch.Generator().manual_seed(1))
    assert not set(zip(t[:, 0].tolist(), t[:, 2].tolist())) & set(held)


def test_early_stopping_drops_lr_then_stops_and_keeps_the_best_weights(cat):
    from vars_fast.recommenders.base import train_bpr

    m = build_recommender("BPR", cat.n_users, cat.n_items, rcfg(), seed=0)
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.25, 0.1, 0.9, 0.9])
    seen = []

    def validate():
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    hist = train_bpr(m, cat, m.loss, epochs=20, lr=0.05, lr_low=0.01, lr_drop_frac=0.8, batch_size=16,
                     generator=torch.Generator().manual_seed(0), show_progress=False, validate=validate, patience=2)
    # best 0.3 after epoch 2; two stale epochs -> lr drop; two more -> stop after epoch 6
    assert len(hist) == 6 and len(seen) == 6
    for k, v in seen[1].items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)


def test_real_photos_below_native_size_warn(caplog):
    from vars_fast.config import make_config
    from vars_fast.recommenders.stage import warn_small_images

    log = logging.getLogger("test.size")
    assert not warn_small_images(make_config("default"), log)  # synthetic: 64 px is enough
    cfg = make_config("default", overrides={"data.source": "generic"})
    with caplog.at_level(logging.WARNING, logger="test.size"):
        assert warn_small_images(cfg, log)
    assert "data.image_size=64" in caplog.text and "224" in caplog.text
    assert not warn_small_images(make_config("default", overrides={"data.source": "amazon", "data.image_size": 224}), log)
