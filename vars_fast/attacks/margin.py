"""The ranking-margin objective of the catalogue attack (``attack.loss: margin``), beside the BPR loss.

HR@10 counts whether an item makes a user's top 10, not whether it beats one random negative,
so an attacker who wants the item out of its users' top lists pushes the gap to the 10th-best
competitor, not a BPR pair (Carlini & Wagner's margin, in ranking form). For item k and each
user u the attacker targets (under the ``train`` objective: k's training users),

    margin(u, k) = y_uk(x_k) - y_uc,   c = the ``rank``-th best competitor of k for u

the competitors being every other item that is not one of u's training positives, scored with
their clean features (the attacker moves only k's image, so their scores are constants:
computed once for all (u, k) pairs before the attack, ``margin_targets``). Item k's loss is the
mean of ``-margin(u, k)`` over its target users: maximising it demotes k below the top
``rank`` (unclipped: the gradient keeps pushing after k has left the top 10, which never
helps the ranking back). A user with fewer than ``rank`` competitors uses the last one.

The targets are an ``ItemTriples`` as the BPR loss's, so the catalogue loop (``attack_items``)
runs both unchanged: ``users`` the target users (all of k's training users when they are at
most ``per_item``, else ``per_item`` of them drawn without replacement), ``others`` the
competitor c of each (u, k), ``sign`` the weight of the entry (1, or 0 for padding; an item
without training users gets weight 0 throughout, so its loss is 0 and the attack leaves it at
its start).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vars_fast.attacks.base import CatalogueLoss
from vars_fast.attacks.untargeted import ItemTriples
from vars_fast.registry import ATTACK_LOSSES

RANK = 10  # HR@10: the competitor the item must fall below


def item_users(cat, per_item: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each item's target users, users int64 [N, m] and weight float [N, m] (0: padding): all of
    the item's training users when it has at most ``m = per_item``, else m of them drawn
    uniformly without replacement from ``generator``."""
    train = cat.train.long().cpu()
    N, m = int(cat.n_items), int(per_item)
    if m < 1:
        raise ValueError(f"attack.triples_per_item must be >= 1 (got {m})")
    item, user = train[:, 1], train[:, 0]
    # random order within each item: sort by item + a uniform fraction
    key = item.double() + torch.rand(item.shape, generator=generator, dtype=torch.float64)
    order = torch.argsort(key)
    item, user = item[order], user[order]
    counts = torch.bincount(item, minlength=N)
    offs = torch.cumsum(counts, 0) - counts
    slot = torch.arange(item.numel()) - offs[item]
    keep = slot < m
    users = torch.zeros(N, m, dtype=torch.long)
    weight = torch.zeros(N, m, dtype=torch.float32)
    users[item[keep], slot[keep]] = user[keep]
    weight[item[keep], slot[keep]] = 1.0
    return users, weight


@torch.no_grad()
def competitors(rec, cat, users: Tensor, items: Tensor, rank: int = RANK, max_scores: int = 1 << 18) -> Tensor:
    """For pairs (users[p], items[p]) [P]: the ``rank``-th best item by ``rec``'s clean score among
    the items that are neither ``items[p]`` nor a training positive of ``users[p]`` (the last
    such item when there are fewer; ``items[p]`` itself when there is none), int64 [P] on the CPU.

    Each distinct user's catalogue is scored once (``score_catalogue`` where the model has it),
    ``max_scores`` (user, item) scores at a time."""
    users, items = users.long().cpu(), items.long().cpu()
    N = int(cat.n_items)
    uniq, inv = torch.unique(users, return_inverse=True)
    K = min(rank + 1, N)  # one spare: the item itself may be among the best
    top_i = torch.empty(uniq.numel(), K, dtype=torch.long)
    top_v = torch.empty(uniq.numel(), K, dtype=torch.float32)
    train = cat.train.long().cpu()
    dev = rec.device if hasattr(rec, "device") else next(rec.parameters()).device
    score = getattr(rec, "score_catalogue", rec.score)
    where = torch.full((int(cat.n_users),), -1, dtype=torch.long)
    chunk = max(1, max_scores // N)
    all_items = torch.arange(N, device=dev)
    for s in range(0, uniq.numel(), chunk):
        us = uniq[s:s + chunk]
        sc = score(us.to(dev), all_items.expand(us.numel(), N)).float().cpu()
        where[us] = torch.arange(us.numel())
        row = where[train[:, 0]]
        pos = train[row >= 0]
        sc[where[pos[:, 0]], pos[:, 1]] = -torch.inf  # the user's own positives are not competitors
        where[us] = -1
        v, i = sc.topk(K, dim=1)
        top_v[s:s + chunk], top_i[s:s + chunk] = v, i
    cand, val = top_i[inv], top_v[inv]  # [P, K]
    valid = torch.isfinite(val) & (cand != items[:, None])
    nth = torch.cumsum(valid.long(), 1)
    hit = valid & (nth == rank)
    last = valid & (nth == nth[:, -1:])  # the last valid one (fewer than rank competitors)
    col = torch.where(hit.any(1), hit.float().argmax(1), last.float().argmax(1))
    out = cand.gather(1, col[:, None]).squeeze(1)
    return torch.where(valid.any(1), out, items)


def margin_targets(rec, cat, per_item: int, generator: torch.Generator, roles: str | None = None,
                   rank: int = RANK) -> ItemTriples:
    """The margin objective's per-item targets (module docstring) as ``ItemTriples``: users
    [N, m], others [N, m] (each pair's competitor), sign [N, m] (the weight). ``roles`` does
    not apply (every target user likes the item)."""
    users, weight = item_users(cat, per_item, generator)
    N, m = users.shape
    items = torch.arange(N).repeat_interleave(m)
    others = competitors(rec, cat, users.reshape(-1), items, rank).view(N, m)
    return ItemTriples(users, others, weight)


def margin_item_loss(rec, x: Tensor, users: Tensor, items: Tensor, s_other: Tensor, weight: Tensor) -> Tensor:
    """Item ``items[b]``'s mean of ``-(y_uk - y_uc)`` over its target users, a function of its
    image ``x[b]``: the same signature as ``untargeted.item_loss`` (``s_other`` [B, m]: the
    competitors' clean scores, from ``item_loss_fn``; ``weight`` [B, m] in place of the sign)."""
    B, m = users.shape
    f = rec.encode(x)
    s_k = rec.score(users.reshape(-1), items.repeat_interleave(m),
                    visual=f.repeat_interleave(m, dim=0)).float().view(B, m)
    return -(weight * (s_k - s_other)).sum(1) / weight.sum(1).clamp_min(1.0)


ATTACK_LOSSES.register("margin", CatalogueLoss(targets=margin_targets, item_loss=margin_item_loss))
