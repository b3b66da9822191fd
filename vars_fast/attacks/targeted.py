"""Targeted (promotion) attacks on VBPR: target choice, the attacks, and their metrics.

Targets: ``n_targets`` items drawn (seeded, without replacement) from the coldest half of
the catalogue by training popularity (ties broken at random), among items whose image is
``ok``: promoting cold items is the interesting case (Liu and Larson, 2021). The hook for
AIP-EXPA is the most popular ok item. The TAaMR target class is ``taamr.popular_class``.

Metrics (METHOD.md Eq. 13): the mean average prediction shift
``mean_t (1/|U|) sum_u (y'_ut - y_ut)`` via ``vars_fast.metrics.prediction_shift`` and the
targets' HR@N: for every (user, target) pair where the target is not one of the user's
training positives, the target is ranked against the user's stored sampled negatives (with
the attacked targets' new features wherever a target is among them; the target itself is
removed from its own candidate list); HR@N is the fraction of pairs in the top N.
"""
from __future__ import annotations

import torch
from torch import Tensor

from types import SimpleNamespace

from vars_fast.attacks.base import frozen, quantize_within
from vars_fast.attacks.pgd import default_alpha
from vars_fast.attacks.untargeted import wrap_loss
from vars_fast.metrics import hr_ndcg, prediction_shift
from vars_fast.nn.fuse import fast_copy
from vars_fast.registry import ATTACKS, TARGETED


def item_popularity(cat) -> Tensor:
    return torch.bincount(cat.train[:, 1].cpu(), minlength=cat.n_items)


def _ok(cat) -> Tensor:
    return torch.tensor([s == "ok" for s in cat.status], dtype=torch.bool)


def choose_targets(cat, n: int, generator: torch.Generator) -> Tensor:
    """Sorted int64 [T] target items: a seeded draw from the coldest half of the ok items."""
    ok = _ok(cat).nonzero().squeeze(1)
    pop = item_popularity(cat)[ok].double()
    tie = torch.rand(ok.numel(), generator=generator, dtype=torch.float64)
    order = torch.argsort(pop + 0.5 * tie)  # counts are integers: the tie-break never reorders them
    pool = ok[order[: max(1, ok.numel() // 2)]]
    pick = torch.randperm(pool.numel(), generator=generator)[: min(n, pool.numel())]
    return torch.sort(pool[pick]).values


def choose_hook(cat) -> int:
    pop = item_popularity(cat).double()
    pop[~_ok(cat)] = -1
    return int(pop.argmax())


def targeted_attack(name: str, rec, backbone, cat, targets: Tensor, eps255: float, cfg, generator: torch.Generator,
                    device: torch.device, *, users: Tensor | None = None, hook_feature: Tensor | None = None,
                    target_class: int | None = None, amp: bool = False, init: Tensor | None = None) -> Tensor:
    """Attack the target images; returns uint8 [T,3,S,S] within eps255 of the clean ones.

    name: a member of ``TARGETED``; users: the users INSA averages over (default all);
    hook_feature [F]: EXPA's hook visual feature; target_class: TAaMR's ImageNet class.
    The attacks with an iterative optimiser (all but TAaMR-FGSM) run ``cfg.target_steps`` steps of
    ``cfg.target_alpha`` (0: 2.5 eps / steps) and return each target's best iterate when
    ``cfg.target_keep_best``; ``init`` (uint8 [T,3,S,S], e.g. the result at a smaller eps)
    replaces the random start, so the attack at this eps never ends below it.
    """
    spec = TARGETED[name]  # ConfigError naming attack.targets
    optimiser = ATTACKS[spec.optimiser]
    eps = float(eps255) / 255.0
    steps = int(getattr(cfg, "target_steps", 0) or cfg.pgd_steps)
    a255 = float(getattr(cfg, "target_alpha", 0.0) or 0.0)
    alpha = a255 / 255.0 if a255 > 0 else default_alpha(eps, steps)
    keep_best = bool(getattr(cfg, "target_keep_best", False))
    if users is None:
        users = torch.arange(cat.n_users)
    out = torch.empty((targets.numel(),) + tuple(cat.images.shape[1:]), dtype=torch.uint8)
    if getattr(cfg, "fast_encoder", False):  # BN-folded NHWC copies (see nn/fuse.py)
        example = cat.item_batch(targets[:4], device)
        shared = backbone is getattr(rec, "backbone", None)
        if spec.through == "backbone":
            backbone = fast_copy(rec, example).backbone if shared else backbone
        else:
            rec = fast_copy(rec, example)
    with frozen(rec, backbone, getattr(rec, "backbone", None)):
        for s in range(0, targets.numel(), int(cfg.batch_size)):
            t = targets[s: s + int(cfg.batch_size)]
            x = cat.item_batch(t, device)
            batch = SimpleNamespace(rec=rec, backbone=backbone, targets=t.to(device), users=users.to(device),
                                    hook_feature=None if hook_feature is None else hook_feature.to(device),
                                    target_class=target_class)
            fn = wrap_loss(spec.loss(batch), device, amp)
            start = init[s: s + t.numel()].to(device).float() / 255 if init is not None and spec.iterative else None
            x_adv = optimiser.craft(fn, x, eps, alpha=alpha, steps=steps, random_start=cfg.random_start,
                                    generator=generator, keep_best=keep_best, init=start)
            out[s: s + t.numel()] = quantize_within(x_adv.cpu(), cat.images[t], eps255)
    return out


@torch.no_grad()
def target_scores(rec, targets: Tensor, visual: Tensor, n_users: int, chunk: int = 128) -> Tensor:
    """Scores [U, T] of every user for the targets with visual representation ``visual`` [T, F]."""
    dev = visual.device
    T = targets.numel()
    rows = []
    for s in range(0, n_users, chunk):
        u = torch.arange(s, min(s + chunk, n_users), device=dev)
        items = targets.to(dev).view(1, T).expand(u.numel(), T)
        rows.append(rec.score(u, items, visual=visual.unsqueeze(0).expand(u.numel(), T, visual.shape[1])).float())
    return torch.cat(rows)


@torch.no_grad()
def targeted_metrics(rec, cat, targets: Tensor, before: Tensor, after: Tensor, topk=(5, 10, 20),
                     chunk: int = 128) -> dict:
    """{"prediction_shift", "HR@N"...} from target scores before / after the attack ([U, T] each)."""
    dev = after.device
    U, T = after.shape
    negs = cat.negatives.to(dev)
    neg_scores = []
    for s in range(0, U, chunk):
        u = torch.arange(s, min(s + chunk, U), device=dev)
        neg_scores.append(rec.score(u, negs[u]).float())
    neg_scores = torch.cat(neg_scores)  # [U, C] with clean features
    # targets among the sampled negatives compete with their attacked features
    tpos = torch.full((cat.n_items,), -1, dtype=torch.long, device=dev)
    tpos[targets.to(dev)] = torch.arange(T, device=dev)
    slot = tpos[negs]  # [U, C]: index into targets or -1
    is_t = slot >= 0
    neg_scores[is_t] = after[torch.arange(U, device=dev).unsqueeze(1).expand_as(slot)[is_t], slot[is_t]]

    pos_users = cat.user_pos()
    u_idx, t_idx = [], []
    for t_i, t in enumerate(targets.tolist()):
        for u in range(U):
            if t not in pos_users[u]:
                u_idx.append(u)
                t_idx.append(t_i)
    u_idx = torch.tensor(u_idx, device=dev)
    t_idx = torch.tensor(t_idx, device=dev)
    pos = after[u_idx, t_idx]
    neg = neg_scores[u_idx].clone()
    neg[negs[u_idx] == targets.to(dev)[t_idx].unsqueeze(1)] = float("-inf")  # not against itself
    res = {k: v for k, v in hr_ndcg(pos, neg, topk=tuple(topk)).items() if k.startswith("HR@")}
    res["prediction_shift"] = float(prediction_shift(before, after))
    return {k: float(v) for k, v in res.items()}
