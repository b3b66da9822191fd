"""The bounded VBPR (recommenders/bounded.py): its cap holds after training, its certificate is
sound (no feature change beats it) and tight (the worst case reaches it, user by user), and a
certificate computed from the uncapped weights would be wrong."""
from __future__ import annotations

import pytest
import torch

from test_recommenders import FDIM, LinearBackbone, rcfg, tiny_catalogue
from vars_fast.config import BoundedConfig
from vars_fast.metrics import hr_ndcg, ranking_metrics
from vars_fast.recommenders import build_recommender, encode_catalogue
from vars_fast.recommenders.bounded import BoundedVBPR, certified_metrics, certified_shift

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(cap: float, epochs: int = 8, n_users: int = 12):
    cat, bb = tiny_catalogue(n_users=n_users, n_items=16), LinearBackbone()
    rc = rcfg(epochs=epochs, bounded=BoundedConfig(cap=cap))
    m = build_recommender("VBPR-bounded", cat.n_users, cat.n_items, rc, backbone=bb, seed=0)
    feats = encode_catalogue(m, cat.images, progress=False)
    m.fit(cat, rc, torch.Generator().manual_seed(0), show_progress=False, features=feats)
    return m, cat, feats


@pytest.fixture(scope="module")
def model():
    return _trained(cap=0.5)


def test_the_cap_holds_after_training_and_in_the_checkpoint(model, tmp_path):
    from vars_fast.recommenders import load_recommender, save_recommender

    m, cat, _ = model
    users = torch.arange(cat.n_users)
    assert (m.visual_bound(users) <= 0.5 + 1e-6).all()
    # uncapped, the weights would exceed it: the cap binds, it is not idle
    raw = (m.P[users] @ m.E + m.beta_visual).norm(dim=1)
    assert (raw > 0.5).any()
    save_recommender(m, tmp_path / "b.pt")
    back = load_recommender(tmp_path / "b.pt", backbone=LinearBackbone())
    assert isinstance(back, BoundedVBPR) and back.cap == 0.5
    torch.testing.assert_close(back.visual_bound(users), m.visual_bound(users))


def _user_scores(m, cat, feats_per_user):
    """Scores of each user's test item and negatives with its own feature table [U, N, F]."""
    test, negs = cat.test, cat.negatives
    pos = torch.stack([m.score(torch.tensor([u]), test[u:u + 1], feats_per_user[u][test[u:u + 1]])[0]
                       for u in range(cat.n_users)])
    neg = torch.stack([m.score(torch.tensor([u]), negs[u][None], feats_per_user[u][negs[u]][None])[0]
                       for u in range(cat.n_users)])
    return pos, neg


def test_the_certificate_is_sound_and_tight(model):
    m, cat, feats = model
    cert = certified_metrics(m, cat, topk=(1, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # random feature tables, shared by all users: never below the certificate
        for _ in range(20):
            f = feats.mean(0) + 5 * feats.std(0) * torch.randn(feats.shape, generator=g)
            got = ranking_metrics(m, cat, visual=f, topk=(1, 3))
            assert got["HR@1"] >= cert["HR@1"] - 1e-9 and got["HR@3"] >= cert["HR@3"] - 1e-9
        # the worst case, each user's own: the test item along -w_u, every candidate along +w_u
        U = cat.n_users
        w = m.visual_weight(m.P[torch.arange(U)])  # [U, F]
        direction = w / w.norm(dim=1, keepdim=True)
        worst = m.feat_mean + m.feat_scale * direction[:, None, :].expand(U, cat.n_items, FDIM).clone()
        for u in range(U):
            worst[u, cat.test[u]] = m.feat_mean - m.feat_scale * direction[u]
        pos, neg = _user_scores(m, cat, worst)
        tight = hr_ndcg(pos, neg, (1, 3))
    assert tight["HR@1"] == pytest.approx(cert["HR@1"]) and tight["HR@3"] == pytest.approx(cert["HR@3"])
    assert cert["HR@3"] <= ranking_metrics(m, cat, topk=(3,))["HR@3"]


def test_gradient_attacks_in_feature_space_stay_above_the_certificate(model):
    """PGD on the feature table (every item at once) to push each test item down: above the certificate."""
    m, cat, feats = model
    cert = certified_metrics(m, cat, topk=(3,))["HR@3"]
    f = feats.clone().requires_grad_(True)
    opt = torch.optim.Adam([f], lr=0.5)
    users = torch.arange(cat.n_users)
    for _ in range(60):
        s_pos = m.score(users, cat.test, f[cat.test])
        s_neg = m.score(users, cat.negatives, f[cat.negatives])
        loss = (s_pos - s_neg.max(1).values).sum()  # demote the test item below its best competitor
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        got = ranking_metrics(m, cat, visual=f.detach(), topk=(3,))["HR@3"]
    assert got >= cert - 1e-9
    assert got < ranking_metrics(m, cat, topk=(3,))["HR@3"]  # the attack did something


def test_a_vanishing_cap_certifies_the_image_blind_model():
    m, cat, _ = _trained(cap=1e-9, epochs=2)
    cert = certified_metrics(m, cat, topk=(3,))
    with torch.no_grad():
        pos = m.nonvisual(m.P, cat.test)
        neg = m.nonvisual(m.P[:, None], cat.negatives)
    assert cert["HR@3"] == pytest.approx(hr_ndcg(pos, neg, (3,))["HR@3"], abs=1e-9)


def test_the_uncapped_weights_would_give_a_different_certificate(model):
    """From ||E^T p_u + beta'|| instead of the capped norm the certificate is looser than the one
    the worst case reaches (so test_the_certificate_is_sound_and_tight fails with it); the
    prediction-shift bound lies within twice the mean capped norm."""
    m, cat, _ = model
    users = torch.arange(cat.n_users)
    with torch.no_grad():
        capped = m.visual_bound(users)
        raw = (m.P[users] @ m.E + m.beta_visual).norm(dim=1)
        pos = m.nonvisual(m.P, cat.test) - raw
        neg = m.nonvisual(m.P[:, None], cat.negatives) + raw[:, None]
    assert (raw >= capped - 1e-6).all() and (raw > capped + 1e-3).any()
    assert hr_ndcg(pos, neg, (3,))["HR@3"] < certified_metrics(m, cat, topk=(3,))["HR@3"]
    shift = certified_shift(m, torch.tensor([0, 3]))
    assert 0 <= shift <= 2 * float(capped.mean()) + 1e-6
