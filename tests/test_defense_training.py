"""Joint training (Eq. 12): schedule, item split, a real (tiny) training run, resume after a kill."""
import dataclasses

import pytest
import torch

from vars_fast.config import DefenseConfig
from vars_fast.defense import load_defense, save_defense
from vars_fast.defense.training import epoch_plan, split_items, train_defense, variant_config

BB = {"name": "efficientnet_lite0", "weights": "none", "input_size": 0}


def tiny_dcfg(**kw) -> DefenseConfig:
    base = dict(width=4, n_res_blocks=1, patch_size=8, heads=1, embed_dim=8, proj_hidden=16, proj_dim=8,
                epochs_phase1=1, epochs_phase2=1, detector_epochs=1, batch_size=6, train_pgd_steps=1,
                triples_per_item=2, train_eps=[8, 16], train_item_frac=0.15, val_item_frac=0.1)
    base.update(kw)
    return DefenseConfig(**base)


@pytest.fixture(scope="module")
def setup(tiny_catalogue):
    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig, RecommenderConfig
    from vars_fast.recommenders import build_recommender, encode_catalogue

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(**BB))
    rec = build_recommender("VBPR", tiny_catalogue.n_users, tiny_catalogue.n_items, RecommenderConfig(k=8), bb)
    feats = encode_catalogue(rec, tiny_catalogue.images, 64, "cpu", False)
    rec.set_item_visual(feats)
    rec.fit_feature_norm(feats)
    rec.eval().requires_grad_(False)
    return tiny_catalogue, rec, bb


def test_epoch_plan_and_variants():
    d = DefenseConfig(epochs_phase1=2, epochs_phase2=1, detector_epochs=2, detector_eps=16)
    plan = epoch_plan(d)
    assert [p["phase"] for p in plan] == ["clean+fgsm"] * 2 + ["clean/fgsm/pgd"] + ["detector"] * 2
    assert [p["detector"] for p in plan] == [False, False, True, True, True]
    assert plan[-1]["kinds"] == ["fgsm"] and plan[-1]["eps"] == [16]
    nod = variant_config(d, "no-detector")
    assert not nod.use_detector and nod.lambda_contrastive == 0 and len(epoch_plan(nod)) == 3
    nop = variant_config(d, "no-perceptual")
    assert nop.lambda_perceptual == 0 and nop.use_detector
    with pytest.raises(ValueError, match="no-such"):
        variant_config(d, "no-such")


def test_split_is_seeded_disjoint_and_skips_missing(tiny_catalogue):
    cat = dataclasses.replace(tiny_catalogue, status=["missing"] + ["ok"] * (tiny_catalogue.n_items - 1))
    a = split_items(cat, torch.Generator().manual_seed(1), 0.5, 0.2)
    b = split_items(cat, torch.Generator().manual_seed(1), 0.5, 0.2)
    assert a == b
    allk = a["train"] + a["val"] + a["test"]
    assert len(allk) == len(set(allk)) == cat.n_items - 1 and 0 not in allk
    assert len(a["train"]) == round(0.5 * (cat.n_items - 1))


def test_training_runs_and_resumes_after_kill(setup, tmp_path):
    cat, rec, bb = setup
    dcfg = tiny_dcfg()
    split = split_items(cat, torch.Generator().manual_seed(0), dcfg.train_item_frac, dcfg.val_item_frac)
    kw = dict(backbone_cfg=BB, device="cpu", seed=3, progress=False)

    ref, hist = train_defense(cat, rec, bb, dcfg, split, state_path=tmp_path / "ref.pt", **kw)
    assert [h["phase"] for h in hist] == ["clean+fgsm", "clean/fgsm/pgd", "detector"]
    assert hist[-1]["contrastive"] > 0 and all(h["content"] > 0 for h in hist)
    # the denoiser moved away from its identity init, the recommender did not move
    assert any(p.abs().sum() > 0 for p in ref.denoiser.conv_out.parameters())
    assert not any(p.requires_grad for p in rec.parameters())

    class Killed(Exception):
        pass

    def kill_after_first(epoch, _):
        if epoch == 1:
            raise Killed

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train_defense(cat, rec, bb, dcfg, split, state_path=state, on_epoch_end=kill_after_first, **kw)
    seen = []
    resumed, hist2 = train_defense(cat, rec, bb, dcfg, split, state_path=state,
                                   on_epoch_end=lambda e, _: seen.append(e), **kw)
    assert seen == [2, 3]  # epoch 1 was not redone
    assert [h["epoch"] for h in hist2] == [1, 2, 3]
    for a, b in zip(ref.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(ref.detector.state_dict().values(), resumed.detector.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a finished state skips training altogether
    seen.clear()
    train_defense(cat, rec, bb, dcfg, split, state_path=state, on_epoch_end=lambda e, _: seen.append(e), **kw)
    assert seen == []
    # a different configuration does not resume from a foreign state
    other = tiny_dcfg(lr=5e-4, detector_epochs=0, epochs_phase2=0)
    _, h3 = train_defense(cat, rec, bb, other, split, state_path=state, **kw)
    assert len(h3) == 1

    save_defense(resumed, tmp_path / "defense.pt")
    assert load_defense(tmp_path / "defense.pt").split == split


def test_training_figure(tmp_path):
    from vars_fast.defense.stage import checkpoint_name, plot_training

    hist = [{"epoch": e, "total": 1.0 / e, "rec": 0.5, "content": 0.01 / e, "perceptual": 3.0 / e,
             "contrastive": 0.0 if e < 2 else 2.0 / e} for e in (1, 2, 3)]
    plot_training({"full": hist, "no-detector": hist[:2]}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert checkpoint_name("full") == "defense" and checkpoint_name("no-perceptual") == "defense_no-perceptual"


def test_shared_backbone_pass_matches_separate_losses(setup):
    import copy

    from vars_fast.attacks.untargeted import sample_item_triples
    from vars_fast.defense.training import _ItemObjective, _rec_and_perceptual

    cat, rec, bb = setup
    idx = torch.arange(4)
    fn = _ItemObjective(rec, sample_item_triples(cat, 2, torch.Generator().manual_seed(0)), idx, "cpu")
    x = cat.item_batch(idx)
    out = (torch.cat([x, x]) + 0.05 * torch.randn(8, *x.shape[1:])).clamp(0, 1)
    shared = _rec_and_perceptual(rec, bb, fn, x, out, 2, True)  # rec.backbone is bb: one trunk pass
    separate = _rec_and_perceptual(rec, copy.deepcopy(bb), fn, x, out, 2, True)
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float(shared[1]) > 0
    torch.testing.assert_close(fn.from_visual(rec.encode(x)), fn(x))


def test_no_detector_reuses_full_phase1_exactly(setup, tmp_path):
    """Phase 1 is the same computation with and without a detector: no-detector started from
    full's phase-1 snapshot ends where no-detector trained from scratch ends (same seed)."""
    cat, rec, bb = setup
    dcfg = tiny_dcfg(epochs_phase1=2)
    split = split_items(cat, torch.Generator().manual_seed(0), dcfg.train_item_frac, dcfg.val_item_frac)
    kw = dict(backbone_cfg=BB, device="cpu", seed=5, progress=False)
    p1 = tmp_path / "phase1.pt"
    train_defense(cat, rec, bb, dcfg, split, phase1_path=p1, **kw)
    assert p1.is_file()
    nod = variant_config(dcfg, "no-detector")
    epochs = []
    shared, hist_s = train_defense(cat, rec, bb, nod, split, phase1_path=p1,
                                   on_epoch_end=lambda e, _: epochs.append(e), **kw)
    assert epochs == [3]  # only phase 2 ran here
    scratch, hist_f = train_defense(cat, rec, bb, nod, split, **kw)
    assert [h["phase"] for h in hist_s] == [h["phase"] for h in hist_f]
    for a, b in zip(shared.denoiser.state_dict().values(), scratch.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ("total", "content", "perceptual", "rec"):
        assert hist_s[-1][k] == pytest.approx(hist_f[-1][k], rel=1e-4, abs=1e-7)

    # a config that acts differently in phase 1 (another lr) does not take the snapshot
    epochs.clear()
    train_defense(cat, rec, bb, dataclasses.replace(nod, lr=2e-3), split, phase1_path=p1,
                  on_epoch_end=lambda e, _: epochs.append(e), **kw)
    assert epochs == [1, 2, 3]


def test_training_lanes_split_full_and_no_detector_together():
    from vars_fast.defense.stage import _lanes

    assert _lanes(["full", "no-detector", "no-perceptual"]) == [["full", "no-detector"], ["no-perceptual"]]
    assert _lanes(["full", "no-perceptual"]) == [["full"], ["no-perceptual"]]
    assert _lanes(["full"]) == [["full"]]


@pytest.mark.parametrize("train_den", [False, True])
def test_detector_phase_leaves_the_denoiser_alone_unless_asked(setup, tmp_path, train_den):
    from vars_fast.io import load_checkpoint

    cat, rec, bb = setup
    dcfg = tiny_dcfg(denoiser_in_detector_phase=train_den)
    split = split_items(cat, torch.Generator().manual_seed(0), dcfg.train_item_frac, dcfg.val_item_frac)
    state, after = tmp_path / "s.pt", {}

    def snap(epoch, _):
        after[epoch] = load_checkpoint(state)

    d, hist = train_defense(cat, rec, bb, dcfg, split, state_path=state, on_epoch_end=snap, backbone_cfg=BB,
                            device="cpu", seed=3, progress=False)
    assert hist[-1]["phase"] == "detector"
    same = all(torch.equal(after[2]["denoiser"][k], v) for k, v in after[3]["denoiser"].items())
    assert same is not train_den
    assert not all(torch.equal(after[2]["detector"][k], v) for k, v in after[3]["detector"].items())
    assert all(p.requires_grad for p in d.denoiser.parameters())  # handed back trainable


def test_identity_weight_keeps_clean_images_closer(setup):
    from vars_fast.metrics import psnr

    cat, rec, bb = setup
    split = split_items(cat, torch.Generator().manual_seed(0), 0.15, 0.1)
    x = cat.item_batch(torch.tensor(split["train"]), "cpu")
    out = {}
    for lam in (0.0, 100.0):  # lr 1e-2: a few steps move D away from the identity
        dcfg = tiny_dcfg(lambda_identity=lam, lr=1e-2, detector_epochs=0, use_detector=False, epochs_phase2=0,
                         epochs_phase1=2)
        d, hist = train_defense(cat, rec, bb, dcfg, split, backbone_cfg=BB, device="cpu", seed=3, progress=False)
        with torch.no_grad():
            out[lam] = psnr(x, d.purify(x))
    assert out[100.0] > out[0.0] + 1.0, out
