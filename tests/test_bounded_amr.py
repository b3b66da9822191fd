"""AMR-bounded (recommenders/bounded.py): AMR's adversarial fine-tuning of a trained VBPR-bounded.
The fine-tuning must not lift the cap, the certificate must stay sound and tight on the
fine-tuned weights, AMR's perturbation must live where the scorer reads (the unit sphere), and
the recommender stage must train the bounded base first and certify the fine-tuned model."""
from __future__ import annotations

import logging

import pytest
import torch

from test_recommenders import FDIM, LinearBackbone, rcfg, tiny_catalogue
from vars_fast.config import AMRConfig, BoundedConfig, Config
from vars_fast.metrics import hr_ndcg, ranking_metrics
from vars_fast.recommenders import (RECOMMENDERS, build_recommender, encode_catalogue, load_recommender,
                                    save_recommender)
from vars_fast.recommenders.bounded import BoundedAMR, BoundedVBPR, certified_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
CAP = 0.5


def _rc(cap=CAP):
    return rcfg(epochs=8, bounded=BoundedConfig(cap=cap), amr=AMRConfig(epochs=3, lr=0.05, eps=0.5))


@pytest.fixture(scope="module")
def models():
    """(VBPR-bounded, AMR-bounded fine-tuned from it, catalogue, clean features)."""
    cat, bb, rc = tiny_catalogue(n_users=12, n_items=16), LinearBackbone(), _rc()
    base = build_recommender("VBPR-bounded", cat.n_users, cat.n_items, rc, backbone=bb, seed=0)
    feats = encode_catalogue(base, cat.images, progress=False)
    base.fit(cat, rc, torch.Generator().manual_seed(0), show_progress=False, features=feats)
    base.eval()
    amr = BoundedAMR.from_trained(base, rc)
    amr.fit(cat, rc, torch.Generator().manual_seed(1), show_progress=False)
    return base, amr.eval(), cat, feats


def test_amr_bounded_fine_tunes_the_bounded_vbpr():
    assert BoundedAMR.base == "VBPR-bounded" and issubclass(BoundedAMR, BoundedVBPR)
    assert BoundedAMR.train_order > RECOMMENDERS["VBPR-bounded"].train_order
    assert BoundedAMR.config_kwargs(_rc(0.25))["cap"] == 0.25


def test_fine_tuning_keeps_the_cap_and_the_checkpoint_keeps_both(models, tmp_path):
    base, amr, cat, _ = models
    users = torch.arange(cat.n_users)
    assert amr.cap == CAP and (amr.visual_bound(users) <= CAP + 1e-6).all()
    with torch.no_grad():
        raw = (amr.P @ amr.E + amr.beta_visual).norm(dim=1)
        moved = sum(float((a - b).abs().max()) for a, b in zip(amr.parameters(), base.parameters()))
    assert (raw > CAP).any()  # the cap binds after fine-tuning, it is not idle
    assert moved > 0  # AMR trained
    save_recommender(amr, tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["kwargs"]["cap"] == CAP
    back = load_recommender(tmp_path / "a.pt", backbone=LinearBackbone())
    assert type(back) is BoundedAMR and (back.cap, back.amr_eps) == (CAP, amr.amr_eps)
    torch.testing.assert_close(back.visual_bound(users), amr.visual_bound(users))
    torch.testing.assert_close(back.score(users, cat.test), amr.score(users, cat.test))


def test_amr_perturbs_the_unit_feature_the_scorer_reads(models):
    """Δ (norm eps) is added to f̂, not to VBPR's f̃: with f̃ the same eps would mean a different
    share of each feature, and the scorer re-normalises anyway."""
    _, amr, cat, feats = models
    f = amr.perturbed_space(feats)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(cat.n_items))
    triples = torch.tensor([[u, int(cat.test[u]), int(cat.negatives[u, 0])] for u in range(cat.n_users)])
    fi, fj, di, dj = amr.perturbation(triples)
    torch.testing.assert_close(fi.norm(dim=1), torch.ones(len(triples)))
    nz = di.norm(dim=1) > 0
    torch.testing.assert_close(di.norm(dim=1)[nz], torch.full((int(nz.sum()),), amr.amr_eps))
    with torch.no_grad():
        assert amr._pair_loss(triples, fi + di, fj + dj) >= amr._pair_loss(triples, fi, fj)
    # what trains is AMR's loss (clean + λ·adversarial), not the bounded VBPR's clean one
    assert float(amr.loss(triples).detach()) > float(BoundedVBPR.loss(amr, triples).detach()) + 1e-4


def test_the_certificate_is_sound_and_tight_after_fine_tuning(models):
    _, m, cat, feats = models
    cert = certified_metrics(m, cat, topk=(1, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):  # random catalogues: never below the certificate
            f = feats.mean(0) + 5 * feats.std(0) * torch.randn(feats.shape, generator=g)
            got = ranking_metrics(m, cat, visual=f, topk=(1, 3))
            assert got["HR@1"] >= cert["HR@1"] - 1e-9 and got["HR@3"] >= cert["HR@3"] - 1e-9
        # each user's own worst case: the test item along -w_u, every candidate along +w_u
        users = torch.arange(cat.n_users)
        w = m.visual_weight(m.P[users])
        d = w / w.norm(dim=1, keepdim=True)
        pos = m.score(users, cat.test, m.feat_mean - m.feat_scale * d)
        neg = m.score(users, cat.negatives, (m.feat_mean + m.feat_scale * d)[:, None].expand(-1, cat.negatives.shape[1], FDIM))
        tight = hr_ndcg(pos, neg, (1, 3))
    assert tight == pytest.approx(cert)


def test_stage_trains_the_bounded_base_and_certifies_only_what_was_asked(tmp_path):
    from vars_fast.pipeline import Context
    from vars_fast.recommenders.stage import run_stage
    from vars_fast.run import RunFolder

    cfg = Config()
    cfg.recommender = rcfg(epochs=2, models=["AMR-bounded"], bounded=BoundedConfig(cap=0.3))
    cfg.run.progress = False
    ctx = Context(cfg, RunFolder(tmp_path / "run"), torch.device("cpu"), logging.getLogger("test"))
    ctx.put("catalogue", tiny_catalogue(n_users=12, n_items=16))
    ctx.put("backbone", LinearBackbone())
    run_stage(ctx)
    assert ctx.run.checkpoint("recommender_VBPR-bounded").is_file()  # the base, trained first
    assert ctx.run.checkpoint("recommender_AMR-bounded").is_file()
    rows = ctx.run.rows("robustness")
    assert {(r["model"], r["attack"], r["certified"]) for r in rows} == {
        ("AMR-bounded", "clean", False), ("AMR-bounded", "any", True)}
    assert all(r["defense"] == "bounded" and r["cap"] == 0.3 for r in rows)
    clean, cert = (next(r["HR@10"] for r in rows if r["certified"] is c) for c in (False, True))
    assert cert <= clean
    stats = ctx.run.load_metrics()["meta"]["bounded"]["AMR-bounded"]
    assert stats["bound_max"] <= 0.3 + 1e-6
