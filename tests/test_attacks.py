"""Attack invariants on a tiny hand-made recommender (conv net + linear scorer)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.attacks import (FGSM, PGD, attack_catalogue, bpr_image_loss, expa_loss, frozen, insa_loss,  # noqa: E402
                               item_loss_fn, quantize_within, sample_item_triples, taamr_loss)
from vars_fast.attacks.targeted import choose_hook, choose_targets, item_popularity, targeted_attack  # noqa: E402
from vars_fast.config import AttackConfig  # noqa: E402
from vars_fast.data import Catalogue  # noqa: E402

S = 12


class TinyRec(nn.Module):
    """y_ui = p_u . (q_i + E f_i), f = a two-layer conv net; the recommender contract in small."""

    name = "TINY"
    uses_images = True

    def __init__(self, n_users: int, n_items: int, k: int = 4, feat: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, feat, 3, stride=2, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.cnn.parameters():
            nn.init.normal_(p, std=0.5, generator=g)
        self.P = nn.Parameter(torch.randn(n_users, k, generator=g))
        self.Q = nn.Parameter(0.1 * torch.randn(n_items, k, generator=g))
        self.E = nn.Linear(feat, k, bias=False)
        nn.init.normal_(self.E.weight, generator=g)
        self.head = nn.Linear(feat, 10)  # "ImageNet" head for TAaMR
        self.item_visual = None

    def encode(self, x):
        return self.cnn(x)

    def classify(self, x):
        return self.head(self.cnn(x))

    def score(self, users, items, visual=None):
        if visual is None:
            visual = self.item_visual[items]
        p = self.P[users]
        if items.dim() == 2:
            p = p.unsqueeze(1)
        return (p * (self.Q[items] + self.E(visual))).sum(-1)

    def set_item_visual(self, feats):
        self.item_visual = feats


def tiny_catalogue(n_users=10, n_items=15, seed=0) -> Catalogue:
    g = torch.Generator().manual_seed(seed)
    pairs = set()
    for u in range(n_users):
        for i in torch.randperm(n_items, generator=g)[: 2 + u % 4].tolist():
            pairs.add((u, i))
    train = torch.tensor(sorted(pairs))
    images = torch.randint(0, 256, (n_items, 3, S, S), generator=g, dtype=torch.uint8)
    negatives = torch.randint(0, n_items, (n_users, 5), generator=g)
    return Catalogue(n_users=n_users, n_items=n_items, train=train, test=torch.zeros(n_users, dtype=torch.long),
                     negatives=negatives, images=images, status=["ok"] * n_items,
                     item_ids=[str(i) for i in range(n_items)], user_ids=[str(u) for u in range(n_users)])


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cat = tiny_catalogue()
    rec = TinyRec(cat.n_users, cat.n_items).eval()
    with torch.no_grad():
        rec.set_item_visual(rec.encode(cat.item_batch(torch.arange(cat.n_items))))
    return rec, cat


def _loss_fn(rec, cat, n=8):
    g = torch.Generator().manual_seed(1)
    trip = torch.stack([torch.randint(0, cat.n_users, (n,), generator=g), torch.randint(0, cat.n_items, (n,), generator=g),
                        torch.randint(0, cat.n_items, (n,), generator=g)], 1)
    x = torch.rand(n, 3, S, S, generator=g)
    # attack the i images only; the j items keep their clean cached features
    return (lambda xi: bpr_image_loss(rec, trip, xi, None)), x


EPS = 8 / 255


@pytest.mark.parametrize("make", [
    lambda f: FGSM(f, EPS),
    lambda f: PGD(f, EPS, steps=4, generator=torch.Generator().manual_seed(3)),
    lambda f: PGD(f, torch.linspace(1, 16, 8) / 255, steps=3, generator=torch.Generator().manual_seed(3)),
    lambda f: FGSM(f, torch.linspace(1, 16, 8) / 255),
])
def test_ball_and_range(setup, make):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    atk = make(f)
    adv = atk(x)
    eps = torch.as_tensor(atk.eps).reshape(-1, 1, 1, 1) if torch.is_tensor(atk.eps) else atk.eps
    assert ((adv - x).abs() <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_loss_goes_up_pgd_beats_fgsm(setup):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    with torch.no_grad():
        clean = f(x).mean()
        fg = f(FGSM(f, EPS)(x)).mean()
        pg = f(PGD(f, EPS, steps=10, random_start=False)(x)).mean()
    assert fg > clean
    assert pg >= fg


def test_pgd_one_step_is_fgsm(setup):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    for eps in (EPS, torch.linspace(2, 9, 8) / 255):
        a = FGSM(f, eps)(x)
        b = PGD(f, eps, alpha=eps, steps=1, random_start=False)(x)
        assert torch.equal(a, b)


def test_pgd_keep_best_is_never_worse_than_its_start_or_its_last_iterate(setup):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    big = 64 / 255  # large sign steps overshoot: the last iterate is not always the best
    with torch.no_grad():
        last = PGD(f, big, steps=4, random_start=False)(x)
        best = PGD(f, big, steps=4, random_start=False, keep_best=True)(x)
        assert ((best - x).abs() <= big + 1e-6).all() and best.min() >= 0 and best.max() <= 1
        assert (f(best) >= f(last) - 1e-6).all() and (f(best) >= f(x) - 1e-6).all()
        # from a given start (the warm start of a larger eps), the result never falls below it
        start = FGSM(f, EPS)(x)
        warm = PGD(f, big, steps=3, random_start=False, keep_best=True)(x, init=start)
        assert (f(warm) >= f(start) - 1e-6).all()


def test_determinism_under_seed(setup):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    run = lambda s: PGD(f, EPS, steps=2, generator=torch.Generator().manual_seed(s))(x)  # noqa: E731
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_no_parameter_gradients_and_state_restored(setup):
    rec, cat = setup
    f, x = _loss_fn(rec, cat)
    rec.train()
    with frozen(rec):
        assert not rec.training and not any(p.requires_grad for p in rec.parameters())
        PGD(f, EPS, steps=2, random_start=False)(x)
    assert rec.training and all(p.requires_grad for p in rec.parameters())
    assert all(p.grad is None for p in rec.parameters())
    rec.eval()


def test_quantize_within_exact_bound():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (4, 3, 9, 9), generator=g, dtype=torch.uint8)
    for eps255 in (4, 7.6, 8):
        x = clean.float() / 255 + (2 * torch.rand(clean.shape, generator=g) - 1) * eps255 / 255
        q = quantize_within(x.clamp(0, 1), clean, eps255)
        assert q.dtype == torch.uint8
        assert (q.int() - clean.int()).abs().max() <= eps255


@pytest.mark.parametrize("roles", ["bpr", "balanced"])
def test_item_triples_roles(setup, roles):
    _, cat = setup
    t = sample_item_triples(cat, 6, torch.Generator().manual_seed(0), roles)
    pos = cat.user_pos()
    pop = torch.bincount(cat.train[:, 1], minlength=cat.n_items).double()
    for k in range(cat.n_items):
        has_users = any(k in p for p in pos)
        for u, o, s in zip(t.users[k].tolist(), t.others[k].tolist(), t.sign[k].tolist()):
            if s > 0:  # (u, k, o): k a positive of u, o not
                assert k in pos[u] and o not in pos[u]
            else:  # (u, o, k): o a positive of u, k not
                assert k not in pos[u] and o in pos[u]
        share = pop[k] / (pop[k] + len(cat.train) / cat.n_items)
        want = (3 if has_users else 0) if roles == "balanced" else int(torch.round(6 * share))
        assert (t.sign[k] > 0).sum() == want


def _catalogue_objective(rec, cat, adv_u8, triples):
    items = torch.arange(cat.n_items)
    f = item_loss_fn(rec, items, triples.users, triples.others, triples.sign)
    with torch.no_grad():
        return f(adv_u8.float() / 255)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_catalogue_attack(setup, method):
    rec, cat = setup
    cfg = AttackConfig(pgd_steps=3, triples_per_item=4, batch_size=4)
    run = lambda bs, seed=0: attack_catalogue(rec, cat, method, 8, cfg, torch.Generator().manual_seed(seed),  # noqa: E731
                                              progress=False, batch_size=bs)
    adv = run(4)
    assert adv.dtype == torch.uint8 and adv.shape == cat.images.shape
    assert (adv.int() - cat.images.int()).abs().max() <= 8
    # batch size does not change the result; the seed fixes it
    assert torch.equal(adv, run(7))
    assert torch.equal(adv, run(15))
    if method == "pgd":
        assert not torch.equal(adv, run(4, seed=1))
    # the per-item objective went up for (nearly) every item
    triples = sample_item_triples(cat, cfg.triples_per_item, torch.Generator().manual_seed(0))
    before = _catalogue_objective(rec, cat, cat.images, triples)
    after = _catalogue_objective(rec, cat, adv, triples)
    assert after.mean() > before.mean()
    assert (after > before).float().mean() >= 0.8


def test_targets_are_cold_and_hook_is_popular(setup):
    _, cat = setup
    pop = item_popularity(cat)
    t = choose_targets(cat, 4, torch.Generator().manual_seed(0))
    assert len(t) == 4 and len(set(t.tolist())) == 4
    assert pop[t].max() <= pop.median()
    assert pop[choose_hook(cat)] == pop.max()
    assert torch.equal(t, choose_targets(cat, 4, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", ["aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd"])
def test_targeted_attacks_move_their_objective(setup, name):
    rec, cat = setup
    cfg = AttackConfig(pgd_steps=5, batch_size=3)
    targets = choose_targets(cat, 4, torch.Generator().manual_seed(0))
    hook = choose_hook(cat)
    hook_f = rec.item_visual[hook]
    with torch.no_grad():
        cls = int(rec.classify(cat.item_batch(targets)).argmin(1)[0])  # a class the targets are far from
    adv = targeted_attack(name, rec, rec, cat, targets, 16, cfg, torch.Generator().manual_seed(0), torch.device("cpu"),
                          hook_feature=hook_f, target_class=cls)
    assert adv.dtype == torch.uint8 and (adv.int() - cat.images[targets].int()).abs().max() <= 16
    fn = {"aip-insa": insa_loss(rec, targets, torch.arange(cat.n_users)), "aip-expa": expa_loss(rec, hook_f)}.get(
        name, taamr_loss(rec, cls))
    with torch.no_grad():
        before, after = fn(cat.item_batch(targets)), fn(adv.float() / 255)
    assert after.mean() > before.mean()


def test_targeted_warm_start_makes_the_objective_monotone_in_eps(setup):
    rec, cat = setup
    cfg = AttackConfig(pgd_steps=5, batch_size=3, target_steps=4, target_keep_best=True, random_start=False)
    targets = choose_targets(cat, 4, torch.Generator().manual_seed(0))
    fn = insa_loss(rec, targets, torch.arange(cat.n_users))
    prev, objective = None, []
    for eps in (4, 8, 16, 32):
        adv = targeted_attack("aip-insa", rec, rec, cat, targets, eps, cfg, torch.Generator().manual_seed(0),
                              torch.device("cpu"), init=prev)
        assert (adv.int() - cat.images[targets].int()).abs().max() <= eps
        with torch.no_grad():
            objective.append(fn(adv.float() / 255))
        prev = adv
    for a, b in zip(objective, objective[1:]):  # per target; 1e-4: the uint8 rounding of a new best
        assert (b >= a - 1e-4 * a.abs().clamp(min=1)).all()


def test_fast_copy_folds_batchnorm_and_keeps_the_function(setup):
    from vars_fast.nn.fuse import fast_copy

    _, cat = setup
    rec = TinyRec(cat.n_users, cat.n_items, seed=1)
    rec.cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for bn in (rec.cnn[1], rec.cnn[4]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    rec.eval()
    x = cat.item_batch(torch.arange(6))
    fast = fast_copy(rec, x[:2])
    assert fast is not rec and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in rec.modules())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(x.contiguous(memory_format=torch.channels_last)), rec.encode(x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(32, 32), (33, 33), (34, 31), (29, 40)])
def test_streamline_rewrites_every_same_padding_exactly(hw):
    """Stride-1 and strided TF-"same" convs of EfficientNet-Lite0 lose their pad copies; the
    function (and its input gradient) stays the same for even, odd and mixed input sizes."""
    import copy

    from vars_fast.nn.fuse import SamePadConv2d, streamline
    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig

    bb = build_backbone(BackboneConfig(name="efficientnet_lite0")).eval()
    fast = copy.deepcopy(bb)
    n = streamline([fast], strided=True)
    kinds = [type(m).__name__ for m in fast.modules()]
    assert n > 0 and "Conv2dDynamicSamePadding" not in kinds and kinds.count("SamePadConv2d") >= 4
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, *hw, generator=g)
    for fmt in (torch.contiguous_format, torch.channels_last):
        fast.to(memory_format=fmt)
        xa = x.clone().contiguous(memory_format=fmt).requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ya, yb = fast.features(xa), bb.features(xb)
        # the rewrite is exact in real arithmetic; oneDNN may pick another conv algorithm for the
        # unpadded input (and for NHWC), so single features move by float rounding (~2e-5 seen)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
        ya.square().sum().backward()
        yb.square().sum().backward()
        # float summation order differs (as between NCHW and NHWC of the original model itself)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-3, atol=1e-4 * float(xb.grad.abs().max()))


@pytest.mark.parametrize("k,hw", [(9, (64, 64)), (3, (10, 14)), (5, (7, 8)), (7, (12, 6)), (1, (6, 6))])
def test_polyphase_conv_equals_the_conv(k, hw):
    """The space-to-depth form of a few-output-channel "same" conv gives the conv's values (odd
    sizes fall back to the conv itself), in NCHW and NHWC; a wrong tap would be O(1) off."""
    from vars_fast.nn.fuse import PolyphaseConv2d

    g = torch.Generator().manual_seed(k)
    conv = nn.Conv2d(6, 3, k, padding=k // 2)
    for p in conv.parameters():
        nn.init.normal_(p, generator=g)
    poly = PolyphaseConv2d(conv)
    x = torch.randn(2, 6, *hw, generator=g)
    with torch.no_grad():
        want = conv(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = poly.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="stride-1"):
        PolyphaseConv2d(nn.Conv2d(6, 3, 3, stride=2, padding=1))


def test_polyphase_copy_of_a_trained_denoiser_keeps_its_output():
    from vars_fast.nn.fuse import PolyphaseConv2d, polyphase_copy
    from vars_fast.defense.denoiser import Denoiser

    g = torch.Generator().manual_seed(0)
    den = Denoiser(width=8, n_res_blocks=1, image_size=16).eval()
    nn.init.normal_(den.conv_out.weight, std=0.05, generator=g)  # as after training (init is zero)
    x = torch.rand(3, 3, 16, 16, generator=g)
    fast, n = polyphase_copy(den, lambda m: m(x))
    assert n == 1 and isinstance(fast.conv_out, PolyphaseConv2d) and type(den.conv_out) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(fast(x), den(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x[:, :, :15, :13]), den(x[:, :, :15, :13]), rtol=1e-5, atol=1e-5)
