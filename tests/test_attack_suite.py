"""The attack suite (issue #22, part 1): APGD, Square, EOT, BPDA and the ranking-margin loss.

Fixtures are tiny (12 px images, a three-conv classifier with cross-entropy, a 3-user x
12-item toy recommender) so the module runs in seconds on a busy 2-core machine. Each test
checks a property a broken attack would violate: the ball, reproducibility, APGD beating PGD
on the same budget, the step-size halving, black-box never beating white-box, noise costing
little, the margin equal to a hand computation and its maximisation demoting the item."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.attacks import APGD, PGD, Square, attack_catalogue, item_loss_fn, sample_item_triples  # noqa: E402
from vars_fast.attacks.apgd import checkpoints  # noqa: E402
from vars_fast.attacks.base import Attack  # noqa: E402
from vars_fast.attacks.bpda import bpda, clamp, quantize_u8, straight_through  # noqa: E402
from vars_fast.attacks.margin import RANK, competitors, margin_targets  # noqa: E402
from vars_fast.attacks.square import p_schedule  # noqa: E402
from vars_fast.attacks.untargeted import item_loss  # noqa: E402
from vars_fast.config import AttackConfig, make_config  # noqa: E402
from vars_fast.data import Catalogue  # noqa: E402
from vars_fast.errors import ConfigError  # noqa: E402
from vars_fast.registry import ATTACK_LOSSES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

S = 12
EPS = 16 / 255


def _classifier(seed: int = 0, width: int = 16, n: int = 32):
    """A random three-conv net whose logits are rescaled to a spread of 3 (a peaked but not
    saturated softmax), its inputs and ``loss(x) -> CE [B]`` against its own clean predictions."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            nn.init.normal_(m.bias, std=0.1, generator=g)
    x = torch.rand(n, 3, S, S, generator=g)
    with torch.no_grad():
        scale = 3.0 / net(x).std(1).mean()
        net[-1].weight.mul_(scale)
        net[-1].bias.mul_(scale)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, (lambda t: F.cross_entropy(net(t), y, reduction="none"))


@pytest.fixture(scope="module")
def clf():
    return _classifier()


def _in_ball(adv, x, eps):
    e = eps.view(-1, 1, 1, 1) if torch.is_tensor(eps) else eps
    return bool(((adv - x).abs() <= e + 1e-6).all()) and adv.min() >= 0 and adv.max() <= 1


# ------------------------------------------------------------------ ball, range, seeds
@pytest.mark.parametrize("make", [
    lambda f, e, s: APGD(f, e, steps=12, n_restarts=2, generator=torch.Generator().manual_seed(s)),
    lambda f, e, s: Square(f, e, n_queries=60, generator=torch.Generator().manual_seed(s)),
], ids=["apgd", "square"])
@pytest.mark.parametrize("eps", [EPS, torch.linspace(1, 32, 32) / 255], ids=["scalar", "per-sample"])
def test_ball_range_and_seed(clf, make, eps):
    _, x, f = clf
    adv = make(f, eps, 3)(x)
    assert _in_ball(adv, x, eps)
    assert not torch.equal(adv, x)
    assert torch.equal(adv, make(f, eps, 3)(x))  # same seed, same images
    assert not torch.equal(adv, make(f, eps, 4)(x))


def test_apgd_beats_pgd_on_the_same_budget(clf):
    """Same eps, same 50 gradient evaluations, same start seed: APGD's loss is at least PGD's
    (keep_best: PGD's best iterate, not its last) for every sample, and higher on average."""
    _, x, f = clf
    a = APGD(f, EPS, steps=50, generator=torch.Generator().manual_seed(1))(x)
    p = PGD(f, EPS, steps=50, keep_best=True, generator=torch.Generator().manual_seed(1))(x)
    with torch.no_grad():
        la, lp = f(a), f(p)
    assert (la >= lp - 1e-5).all(), (la - lp).min()
    assert la.mean() > lp.mean()


def test_more_restarts_never_lower_the_best_loss(clf):
    _, x, f = clf
    one = APGD(f, EPS, steps=10, n_restarts=1, generator=torch.Generator().manual_seed(7))
    three = APGD(f, EPS, steps=10, n_restarts=3, generator=torch.Generator().manual_seed(7))
    a1, a3 = one(x), three(x)
    assert torch.equal(one.trace[0], three.trace[0])  # the same first restart
    assert (three.best_loss >= one.best_loss).all() and (three.best_loss > one.best_loss).any()
    with torch.no_grad():  # best_loss is the returned images' loss
        torch.testing.assert_close(f(a3), three.best_loss)
        torch.testing.assert_close(f(a1), one.best_loss)
    assert three.trace.shape == (3, 11) and (three.trace.diff(dim=1) >= 0).all()  # a running best


# ------------------------------------------------------------------ APGD's step size
def test_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # the authors' code gives the same
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]


def test_apgd_halves_its_step_where_it_oscillates():
    """On a concave loss with its maximum c inside the ball, steps of 2 eps overshoot: the loss
    stops increasing, so the step halves at every checkpoint until APGD sits near c."""
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(4, 3, S, S, generator=g)
    c = x + 0.3 * EPS * torch.sign(torch.randn(x.shape, generator=g))
    f = lambda t: -(t - c).pow(2).flatten(1).sum(1)  # noqa: E731
    atk = APGD(f, EPS, steps=100, random_start=False)
    adv = atk(x)
    eta = atk.step_trace[0]  # [steps, B]
    assert torch.allclose(eta[0], torch.full((4,), 2 * EPS))
    halvings = torch.log2(eta[0] / eta[-1]).round()
    assert (halvings >= 4).all(), halvings  # several halvings, each at a checkpoint
    changes = (eta.diff(dim=0) != 0).any(1).nonzero().squeeze(1) + 1
    assert set(changes.tolist()) <= set(checkpoints(100))
    assert ((adv - c).abs().max() <= eta[-1].max()).item()  # converged to within the last step
    # plain PGD with the same budget and a fixed step stays as far from c as its step
    p = PGD(f, EPS, alpha=2 * EPS, steps=100, random_start=False, keep_best=True)(x)
    assert f(adv).mean() > f(p).mean()


# ------------------------------------------------------------------ black box vs white box; noise
def test_square_does_not_beat_white_box_apgd(clf):
    """On a differentiable model, random search with 1000 queries must not find more than the
    gradient does (if it did, the gradients would be masked): Square's mean loss is at most
    APGD's plus two standard errors of their per-sample difference."""
    _, x, f = clf
    sq = Square(f, EPS, n_queries=1000, generator=torch.Generator().manual_seed(2))
    xs = sq(x)
    xa = APGD(f, EPS, steps=50, n_restarts=2, generator=torch.Generator().manual_seed(2))(x)
    with torch.no_grad():
        ls, la, l0 = f(xs), f(xa), f(x)
    d = ls - la
    assert d.mean() <= 2 * d.std() / d.numel() ** 0.5
    assert ls.mean() > l0.mean() + 0.3 * (la.mean() - l0.mean())  # yet a working attack
    assert sq.queries.eq(1000).all() and sq.trace.shape == (1000,) and (sq.trace.diff() >= 0).all()


def test_uniform_noise_costs_far_less_than_apgd(clf):
    _, x, f = clf
    g = torch.Generator().manual_seed(5)
    noisy = (x + (2 * torch.rand(x.shape, generator=g) - 1) * EPS).clamp(0, 1)
    xa = APGD(f, EPS, steps=20, generator=torch.Generator().manual_seed(5))(x)
    with torch.no_grad():
        l0, ln, la = f(x).mean(), f(noisy).mean(), f(xa).mean()
    assert la - l0 > 0.1
    assert abs(ln - l0) < 0.1 * (la - l0)


def test_square_schedule():
    assert p_schedule(0, 10000, 0.8) == 0.8 and p_schedule(10, 10000, 0.8) == 0.8
    assert p_schedule(11, 10000, 0.8) == 0.4 and p_schedule(8001, 10000, 0.8) == 0.8 / 512
    # rescaled to 1000 iterations: the first halving after iteration 1, the last after 800
    assert p_schedule(1, 1000, 0.8) == 0.8 and p_schedule(2, 1000, 0.8) == 0.4
    assert p_schedule(801, 1000, 0.8) == 0.8 / 512


# ------------------------------------------------------------------ EOT
class _NoisyLoss:
    """A stochastic loss: each call draws a fresh weight w, loss = sum(w * x)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, x):
        w = torch.randn(x.shape[1:], generator=self.g)
        return (x * w).flatten(1).sum(1)


def test_eot_averages_loss_and_gradient_over_draws():
    x = torch.rand(3, 3, 4, 4)
    atk = PGD(_NoisyLoss(0), 0.1, steps=1, eot=5)
    loss, grad = atk.loss_and_grad(x)
    replay = torch.Generator().manual_seed(0)
    ws = [torch.randn(x.shape[1:], generator=replay) for _ in range(5)]
    w = sum(ws) / 5
    torch.testing.assert_close(grad, w.expand_as(x))
    torch.testing.assert_close(loss, (x * w).flatten(1).sum(1))
    # APGD takes the same argument; eot=1 is one call per evaluation
    assert APGD(_NoisyLoss(0), 0.1, eot=4).eot == 4 and Attack(_NoisyLoss(0), 0.1).eot == 1
    with pytest.raises(ValueError):
        PGD(_NoisyLoss(0), 0.1, eot=0)


def test_a_loss_with_its_own_gradient_is_differentiated_through_it():
    """``adaptive.DefendedLoss`` bounds its EOT graph in ``loss_and_grad``; APGD and PGD use it."""
    calls = []

    class Own:
        def __call__(self, x):
            return x.flatten(1).sum(1)

        def loss_and_grad(self, x):
            calls.append(x.shape[0])
            return x.flatten(1).sum(1), torch.ones_like(x)

    x = torch.full((2, 3, 4, 4), 0.5)
    adv = APGD(Own(), 0.1, steps=3, random_start=False)(x)
    assert calls == [2] * 4 and torch.allclose(adv, x + 0.1)


# ------------------------------------------------------------------ BPDA
def test_bpda_forward_is_the_real_op_and_backward_the_identity():
    x = (torch.rand(2, 3, 5, 5, dtype=torch.float64) * 1.4 - 0.2).requires_grad_(True)
    w = torch.randn(x.shape, dtype=torch.float64)
    for st, real in ((quantize_u8, lambda t: torch.round(t * 255.0) / 255.0), (clamp, lambda t: t.clamp(0, 1)),
                     (lambda t: straight_through(torch.floor, t), torch.floor)):
        y = st(x)
        assert torch.equal(y, real(x.detach()))
        (g,) = torch.autograd.grad((w * y).sum(), x)
        assert torch.equal(g, w)  # the gradient flows where the real op has none (rounding, saturation)
    # a differentiable stand-in for the backward pass
    y = bpda(torch.round, x, approx=lambda t: 2 * t)
    assert torch.equal(y, torch.round(x.detach()))
    (g,) = torch.autograd.grad((w * y).sum(), x)
    torch.testing.assert_close(g, 2 * w)


# ------------------------------------------------------------------ the ranking-margin loss
class LinRec(nn.Module):
    """y_ui = p_u . (q_i + E f_i) with f the per-channel mean of the image: a recommender whose
    scores are easy to compute by hand."""

    name = "LIN"
    uses_images = True

    def __init__(self, n_users, n_items, k=3, seed=0, visual_scale=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.P = nn.Parameter(torch.randn(n_users, k, generator=g))
        self.Q = nn.Parameter(torch.randn(n_items, k, generator=g))
        self.E = nn.Parameter(visual_scale * torch.randn(k, 3, generator=g))
        self.item_visual = None

    def encode(self, x):
        return x.mean((2, 3))

    def score(self, users, items, visual=None):
        if visual is None:
            visual = self.item_visual[items]
        p = self.P[users].unsqueeze(1) if items.dim() == 2 else self.P[users]
        return (p * (self.Q[items] + visual @ self.E.t())).sum(-1)


def _catalogue(pairs, n_users, n_items, seed=0) -> Catalogue:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(40, 216, (n_items, 3, S, S), generator=g, dtype=torch.uint8)
    return Catalogue(n_users=n_users, n_items=n_items, train=torch.tensor(sorted(pairs)),
                     test=torch.zeros(n_users, dtype=torch.long), negatives=torch.zeros(n_users, 3, dtype=torch.long),
                     images=images, status=["ok"] * n_items, item_ids=[str(i) for i in range(n_items)],
                     user_ids=[str(u) for u in range(n_users)])


def _with_clean_visual(rec, cat):
    with torch.no_grad():
        rec.item_visual = rec.encode(cat.item_batch(torch.arange(cat.n_items)))
    return rec


def test_margin_equals_a_hand_computation():
    # user 0: 2 positives (10 competitors), user 1: 1 (11), user 2: 3 (9: fewer than RANK)
    pairs = {(0, 0), (0, 5), (1, 0), (2, 0), (2, 3), (2, 7)}
    cat = _catalogue(pairs, 3, 12)
    rec = _with_clean_visual(LinRec(3, 12).eval().requires_grad_(False), cat)
    pos = cat.user_pos()
    tr = margin_targets(rec, cat, 4, torch.Generator().manual_seed(0))
    x = torch.rand(12, 3, S, S, generator=torch.Generator().manual_seed(1))  # some perturbed images
    got = item_loss_fn(rec, torch.arange(12), tr.users, tr.others, tr.sign, loss=ATTACK_LOSSES["margin"].item_loss)(x)

    clean = rec.score(torch.arange(3).repeat_interleave(12), torch.arange(12).repeat(3)).view(3, 12).tolist()
    for k in range(12):
        fk = x[k].mean((1, 2))
        terms = []
        for u in range(3):
            if k not in pos[u]:
                continue
            comp = sorted((clean[u][j] for j in range(12) if j != k and j not in pos[u]), reverse=True)
            s_c = comp[RANK - 1] if len(comp) >= RANK else comp[-1]
            s_k = float((rec.P[u] * (rec.Q[k] + rec.E @ fk)).sum())
            terms.append(-(s_k - s_c))
        want = sum(terms) / len(terms) if terms else 0.0
        assert abs(float(got[k]) - want) < 1e-5, (k, float(got[k]), want)
    # item 0's three users are all its targets; item 1 has none (weight 0, loss 0)
    assert sorted(tr.users[0][tr.sign[0] > 0].tolist()) == [0, 1, 2] and tr.sign[1].sum() == 0


def test_competitors_exclude_the_item_itself():
    """For a pair whose item is not a training positive of the user (the ``eval`` case), the
    item is no competitor of itself: it is skipped, and the next one is taken."""
    cat = _catalogue({(0, 0), (1, 1), (2, 2)}, 3, 12)
    rec = _with_clean_visual(LinRec(3, 12).eval().requires_grad_(False), cat)
    s = rec.score(torch.zeros(12, dtype=torch.long), torch.arange(12))
    s[0] = -torch.inf
    order = s.argsort(descending=True).tolist()  # user 0's competitors, best first
    best = order[0]
    c = competitors(rec, cat, torch.tensor([0, 0]), torch.tensor([best, order[RANK]]))
    assert c.tolist() == [order[RANK], order[RANK - 1]]


def test_maximising_the_margin_demotes_the_item():
    """The catalogue attack with ``attack.loss: margin`` (APGD, 16/255): each attacked item
    falls in its target users' rankings among its competitors."""
    g = torch.Generator().manual_seed(3)
    pairs = {(u, int(i)) for u in range(8) for i in torch.randperm(16, generator=g)[:3]}
    cat = _catalogue(pairs, 8, 16, seed=3)
    rec = _with_clean_visual(LinRec(8, 16, seed=3, visual_scale=10.0).eval(), cat)
    cfg = AttackConfig(loss="margin", pgd_steps=20, triples_per_item=4, batch_size=8, fast_encoder=False)
    adv = attack_catalogue(rec, cat, "apgd", 16, cfg, torch.Generator().manual_seed(0), progress=False)
    assert (adv.int() - cat.images.int()).abs().max() <= 16
    pos = cat.user_pos()

    def ranks(images):
        with torch.no_grad():
            f = rec.encode(images.float() / 255)
        out = []
        for k in range(16):
            for u in range(8):
                if k in pos[u]:
                    s = rec.score(torch.full((16,), u), torch.arange(16), visual=rec.item_visual).detach()
                    s_k = rec.score(torch.tensor([u]), torch.tensor([k]), visual=f[k:k + 1]).detach()
                    others = [j for j in range(16) if j != k and j not in pos[u]]
                    out.append(int((s[others] > s_k).sum()))
        return torch.tensor(out, dtype=torch.float32)

    before, after = ranks(cat.images), ranks(adv)
    assert after.mean() > before.mean() + 1
    assert (after >= before).float().mean() >= 0.9


def test_bpr_is_the_default_and_draws_the_same_triples():
    """``attack.loss: bpr`` is the BPR objective as before: the same triples from the same
    generator, the same per-item loss function; an unknown loss fails in one line."""
    assert AttackConfig().loss == "bpr"
    cat = _catalogue({(u, (u * 5 + j) % 12) for u in range(6) for j in range(3)}, 6, 12)
    spec = ATTACK_LOSSES["bpr"]
    a = spec.targets(None, cat, 5, torch.Generator().manual_seed(0), "bpr")
    b = sample_item_triples(cat, 5, torch.Generator().manual_seed(0), "bpr")
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("users", "others", "sign"))
    assert spec.item_loss is item_loss
    assert make_config("quick", overrides={"attack.loss": "margin"}).attack.loss == "margin"
    with pytest.raises(ConfigError, match=r"^attack\.loss: unknown attack loss 'cw'"):
        make_config("quick", overrides={"attack.loss": "cw"})
