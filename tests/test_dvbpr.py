"""DVBPR on a pretrained backbone: the CNN trains, the small-CNN option, checkpoints, Table 3."""
import math

import pytest
import torch

from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig, ConfigError, DVBPRConfig, RecommenderConfig, make_config
from vars_fast.recommenders import build_recommender, load_recommender, save_recommender
from vars_fast.recommenders.dvbpr import DVBPR, BackboneCNN, SmallCNN, lr_multiplier
from vars_fast.evaluate.ranking import ranking_table


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(BackboneConfig(name="efficientnet_lite0", weights="pretrained"))


def rcfg(dvbpr=None, **kw):
    d = DVBPRConfig(**{"epochs": 1, "batch_size": 64, "lr": 1e-2, "train_blocks": 2, **(dvbpr or {})})
    return RecommenderConfig(**{"k": 8, "threads": 0, **kw}, dvbpr=d)


def test_backbone_cnn_trains_only_its_last_blocks_and_gets_gradients(tiny_catalogue, lite0):
    cat = tiny_catalogue
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, rcfg(), backbone=lite0, seed=0)
    assert isinstance(m.cnn, BackboneCNN)
    # the shared backbone is copied, never trained in place
    assert m.cnn.trunk is not lite0 and not any(p.requires_grad for p in lite0.parameters())
    blocks = m.cnn._blocks()
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert not any(p.requires_grad for p in m.cnn.trunk.net._conv_stem.parameters())
    # ImageNet weights to start from: the copy equals the pretrained trunk
    torch.testing.assert_close(m.cnn.trunk.net._blocks[-1]._project_conv.weight,
                               lite0.net._blocks[-1]._project_conv.weight)

    # one BPR step through the image path: every trainable CNN parameter gets a non-zero gradient
    m.train()
    assert not m.cnn.trunk.training  # BatchNorm keeps the ImageNet statistics
    triples = cat.sample_triples(32, torch.Generator().manual_seed(0))
    phi_i = m.encode(cat.item_batch(triples[:, 1]))
    phi_j = m.encode(cat.item_batch(triples[:, 2]))
    u = triples[:, 0]
    loss = torch.nn.functional.softplus(m._score(u, triples[:, 2], phi_j) - m._score(u, triples[:, 1], phi_i)).mean()
    (loss + m.reg(triples)).backward()
    trainable = m.cnn.trainable_parameters()
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in m.cnn.trunk.net._conv_stem.parameters())


def test_fit_changes_the_trained_blocks_only_and_caches_phi(tiny_catalogue, lite0):
    cat = tiny_catalogue
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, rcfg(), backbone=lite0, seed=0)
    net = m.cnn.trunk.net
    frozen_before = net._blocks[0]._depthwise_conv.weight.clone()
    trained_before = net._blocks[-1]._project_conv.weight.clone()
    head_before = net._conv_head.weight.clone()
    hist = m.fit(cat, rcfg(dvbpr={"epochs": 2}), torch.Generator().manual_seed(0), show_progress=False)
    assert len(hist) == 2 and all(math.isfinite(h) for h in hist)
    assert torch.equal(net._blocks[0]._depthwise_conv.weight, frozen_before)
    assert not torch.equal(net._blocks[-1]._project_conv.weight, trained_before)
    assert not torch.equal(net._conv_head.weight, head_before)
    # item_visual (computed from the cached prefix) is Φ of the clean images through the whole CNN
    assert m.item_visual.shape == (cat.n_items, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.item_visual[:5], m.encode(cat.item_batch(torch.arange(5))),
                                   rtol=1e-4, atol=1e-5)


def test_lr_multiplier_scales_the_adam_step_and_leaves_plain_parameters():
    slow, fast = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    w_slow, w_fast = slow.weight.detach().clone(), fast.weight.detach().clone()
    with lr_multiplier([slow], 0.1):
        torch.testing.assert_close(slow.weight, w_slow)  # same function inside the block
        opt = torch.optim.Adam([*slow.parameters(), *fast.parameters()], lr=0.5)
        (slow(torch.ones(1, 3)) + fast(torch.ones(1, 3))).sum().backward()
        opt.step()
    torch.testing.assert_close((slow.weight - w_slow).abs(), torch.full((2, 3), 0.05))
    torch.testing.assert_close((fast.weight - w_fast).abs(), torch.full((2, 3), 0.5))
    assert [n for n, _ in slow.named_parameters()] == ["weight", "bias"] and type(slow) is torch.nn.Linear


def test_small_cnn_option_still_trains(tiny_catalogue):
    cat = tiny_catalogue
    cfg = rcfg(dvbpr={"cnn": "small", "cnn_width": 4, "input_size": 16})
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, cfg, seed=0)  # needs no backbone
    assert isinstance(m.cnn, SmallCNN) and m.kwargs["cnn"] == "small"
    before = [p.clone() for p in m.cnn.parameters()]
    hist = m.fit(cat, cfg, torch.Generator().manual_seed(0), show_progress=False)
    assert len(hist) == 1 and math.isfinite(hist[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.cnn.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(m.item_visual[:3], m.encode(cat.item_batch(torch.arange(3))), rtol=1e-4, atol=1e-5)


def test_backbone_option_needs_a_backbone_and_a_known_cnn(tiny_catalogue):
    with pytest.raises(ValueError, match="needs the backbone"):
        build_recommender("DVBPR", 4, 4, rcfg())
    with pytest.raises(ConfigError, match="recommender.dvbpr.cnn"):
        make_config("quick", overrides={"recommender.dvbpr.cnn": "resnet"})


def test_checkpoint_round_trip_weights_only(tmp_path, tiny_catalogue, lite0):
    cat = tiny_catalogue
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, rcfg(), backbone=lite0, seed=0)
    m.fit(cat, rcfg(), torch.Generator().manual_seed(0), show_progress=False)
    m.eval()
    path = tmp_path / "DVBPR.pt"
    save_recommender(m, path)
    raw = torch.load(path, weights_only=True)
    assert raw["kwargs"]["cnn"] == "backbone" and raw["kwargs"]["backbone_name"] == "efficientnet_lite0"
    assert any(k.startswith("cnn.trunk.") for k in raw["state_dict"])  # the fine-tuned CNN is DVBPR's own
    back = load_recommender(path)  # no backbone: the architecture is rebuilt and filled from the file
    assert isinstance(back, DVBPR) and isinstance(back.cnn, BackboneCNN) and not back.training
    assert not any(p.requires_grad for p in back.parameters())
    u, it = torch.arange(6), torch.arange(6)
    torch.testing.assert_close(back.score(u, it), m.score(u, it))
    x = cat.item_batch(torch.arange(4))
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), m.encode(x))


def test_table3_holds_dvbpr_rows_only():
    def row(model, defense, attack, eps):
        return {"model": model, "defense": defense, "attack": attack, "eps": eps,
                **{k: 0.1 for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}}

    rows = [row(mod, d, a, 0 if a == "clean" else 8) for mod in ("VBPR", "AMR", "DVBPR")
            for d in ("none", "denoise") for a in ("clean", "fgsm", "pgd")]
    dv = ranking_table(rows, "DVBPR", 8)
    body = [ln for ln in dv.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert len(body) == 6 and not any("AMR" in ln or "VBPR |" in ln.replace("DVBPR", "") for ln in body)
    assert {ln.split("|")[2].strip() for ln in body} == {"DVBPR", "OURS"}
    vb = ranking_table(rows, "VBPR", 8)
    assert sum("| AMR |" in ln for ln in vb.splitlines()) == 3  # AMR stays beside VBPR


def test_attack_reaches_dvbpr_through_its_cnn(tiny_catalogue, lite0):
    """FGSM through the fine-tuned CNN (the attack stage's BN-folded fast copy) moves Φ."""
    from vars_fast.attacks.untargeted import attack_catalogue
    from vars_fast.config import AttackConfig
    from vars_fast.recommenders import encode_catalogue

    cat = tiny_catalogue
    m = build_recommender("DVBPR", cat.n_users, cat.n_items, rcfg(), backbone=lite0, seed=0)
    m.fit(cat, rcfg(), torch.Generator().manual_seed(0), show_progress=False)
    m.eval().requires_grad_(False)
    acfg = AttackConfig(triples_per_item=2, batch_size=40, random_start=False, fast_encoder=True)
    adv = attack_catalogue(m, cat, "fgsm", 8, acfg, torch.Generator().manual_seed(0), progress=False)
    assert (adv.int() - cat.images.int()).abs().max() <= 8 and not torch.equal(adv, cat.images)
    phi_adv = encode_catalogue(m, adv, progress=False)
    assert (phi_adv - m.item_visual).norm(dim=1).mean() > 1e-3 * m.item_visual.norm(dim=1).mean()
