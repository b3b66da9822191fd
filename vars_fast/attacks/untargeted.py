"""Untargeted attack on the whole catalogue: every item gets one adversarial image.

Objective (METHOD.md, "Untargeted attacks": maximise the BPR loss w.r.t. the images).
For item k we sample ``m = triples_per_item`` training triples in which k takes part:

* with k as the **positive**: (u, k, j), u drawn uniformly (with replacement) from k's
  training users, j uniformly from the items u never interacted with;
* with k as the **negative**: (u, i, k), u drawn uniformly from the users who never
  interacted with k, i uniformly from u's training positives.

How many of the m are positive (``attack.triple_roles``): ``"bpr"`` (default) follows the
BPR triple distribution itself (Eq. 1), in which k is the positive pop_k times per epoch and
the sampled negative about |D|/N times, so ``n_pos = round(m * pop_k / (pop_k + |D|/N))``;
``"balanced"``: ``ceil(m/2)``. An item without training users is negative only.

Item k's loss is the mean of ``-ln sigma(y_ui - y_uj)`` over its triples, where only k's
visual representation comes from the image being attacked (``rec.encode``) and the other
item of each triple keeps its clean cached representation (``rec.item_visual``). Raising it
pushes k's score down for the users who like it and up for those who do not, which is what
scrambles the rankings. Items do not interact, so an item's perturbation is independent of
which batch it is in; the triples are drawn for all items up front from one generator and
each item's random start from its own seed, so ``batch_size`` does not change the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.attacks.base import CatalogueLoss, frozen, quantize_within
from vars_fast.attacks.pgd import default_alpha
from vars_fast.nn.fuse import fast_copy
from vars_fast.registry import ATTACK_LOSSES, ATTACKS, OBJECTIVES
from vars_fast.utils import progress as progress_bar


def bpr_image_loss(rec, triples: Tensor, x_i: Tensor | None, x_j: Tensor | None) -> Tensor:
    """Per-sample BPR loss ``-ln sigma(y_ui - y_uj)`` [B] with the items' visual from images.

    triples: int64 [B, 3] (u, i, j); x_i, x_j: float [B,3,S,S] in [0,1] or None (that item
    keeps its clean cached visual). Differentiable in x_i and x_j.
    """
    u, i, j = triples[:, 0], triples[:, 1], triples[:, 2]
    vi = rec.encode(x_i) if x_i is not None else None
    vj = rec.encode(x_j) if x_j is not None else None
    d = rec.score(u, i, visual=vi) - rec.score(u, j, visual=vj)
    return F.softplus(-d.float())  # == -log(sigmoid(d)), stable for large |d|


@dataclass
class ItemTriples:
    """Per-item triples: users, others [N, m] int64; sign [N, m] float (+1: item positive)."""

    users: Tensor
    others: Tensor
    sign: Tensor


def _membership(train: Tensor, n_items: int):
    keys = torch.unique(train[:, 0] * n_items + train[:, 1])  # sorted

    def contains(u: Tensor, i: Tensor) -> Tensor:
        q = u * n_items + i
        pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
        return keys[pos] == q

    return contains


def _csr(key: Tensor, val: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n)
    return val[order], torch.cumsum(counts, 0) - counts, counts


def _pick(vals: Tensor, offs: Tensor, counts: Tensor, rows: Tensor, g: torch.Generator) -> Tensor:
    """One uniform draw from each ``rows``' list (lists must be non-empty)."""
    r = torch.rand(rows.shape, generator=g, dtype=torch.float64)
    k = (r * counts[rows]).long()
    return vals[offs[rows] + torch.minimum(k, counts[rows] - 1)]


def sample_item_triples(cat, per_item: int, generator: torch.Generator, roles: str = "bpr",
                        max_rounds: int = 64) -> ItemTriples:
    """Draw ``per_item`` triples for every item of ``cat``; roles: "bpr" | "balanced" (module docstring)."""
    train = cat.train.long().cpu()
    N, U, m = cat.n_items, cat.n_users, int(per_item)
    if m < 1:
        raise ValueError(f"attack.triples_per_item must be >= 1 (got {m})")
    contains = _membership(train, N)
    users_of, offs_i, cnt_i = _csr(train[:, 1], train[:, 0], N)
    items_of, offs_u, cnt_u = _csr(train[:, 0], train[:, 1], U)
    g = generator

    item = torch.arange(N).repeat_interleave(m)  # [N*m]
    col = torch.arange(m).repeat(N)
    if roles == "bpr":
        share = cnt_i.double() / (cnt_i.double() + train.shape[0] / N)
        n_pos = torch.round(m * share).long()
    elif roles == "balanced":
        n_pos = torch.where(cnt_i > 0, (m + 1) // 2, 0)
    else:
        raise ValueError(f"attack.triple_roles: unknown {roles!r} (bpr | balanced)")
    positive = col < n_pos[item]
    users = torch.empty(N * m, dtype=torch.long)
    others = torch.empty(N * m, dtype=torch.long)

    # k positive: a user of k, and a j that user never interacted with (rejection)
    p = positive.nonzero().squeeze(1)
    users[p] = _pick(users_of, offs_i, cnt_i, item[p], g)
    todo = p
    for _ in range(max_rounds):
        others[todo] = torch.randint(0, N, (todo.numel(),), generator=g)
        todo = todo[contains(users[todo], others[todo])]
        if todo.numel() == 0:
            break

    # k negative: a user who never interacted with k (and has training items), one of their positives
    n = (~positive).nonzero().squeeze(1)
    todo = n
    for _ in range(max_rounds):
        users[todo] = torch.randint(0, U, (todo.numel(),), generator=g)
        bad = contains(users[todo], item[todo]) | (cnt_u[users[todo]] == 0)
        todo = todo[bad]
        if todo.numel() == 0:
            break
    others[n] = _pick(items_of, offs_u, cnt_u, users[n], g)

    sign = torch.where(positive, 1.0, -1.0)
    return ItemTriples(users.view(N, m), others.view(N, m), sign.view(N, m))


def item_loss(rec, x: Tensor, users: Tensor, items: Tensor, s_other: Tensor, sign: Tensor) -> Tensor:
    """Item ``items[b]``'s mean BPR loss over its triples, as a function of its image ``x[b]``.

    x [B,3,S,S]; users, s_other, sign [B, m]; items [B]. A pure function of tensors so that
    ``torch.compile`` sees the same graph for every batch.
    """
    B, m = users.shape
    f = rec.encode(x)  # [B, F]
    s_k = rec.score(users.reshape(-1), items.repeat_interleave(m),
                    visual=f.repeat_interleave(m, dim=0)).float().view(B, m)
    return F.softplus(-sign * (s_k - s_other)).mean(1)


def bpr_targets(rec, cat, per_item: int, generator: torch.Generator, roles: str = "bpr") -> ItemTriples:
    """The BPR loss's targets: ``sample_item_triples`` (the recommender is not needed)."""
    return sample_item_triples(cat, per_item, generator, roles)


# attack.loss "bpr" (the default): the paper's objective; attacks/margin.py holds "margin"
ATTACK_LOSSES.register("bpr", CatalogueLoss(targets=bpr_targets, item_loss=item_loss))


def item_loss_fn(rec, items: Tensor, users: Tensor, others: Tensor, sign: Tensor, loss=item_loss):
    """Return ``(x [B,3,S,S]) -> loss [B]`` for items [B] with triples users/others/sign [B, m].

    The other items' scores are computed once here (clean cached visual, no grad): only
    the attacked item's score depends on x. ``loss``: ``item_loss`` (or another
    ``ATTACK_LOSSES`` member's ``item_loss``) or a compiled copy.
    """
    B, m = users.shape
    with torch.no_grad():
        s_other = rec.score(users.reshape(-1), others.reshape(-1)).float().view(B, m)
    return lambda x: loss(rec, x, users, items, s_other, sign)


def amp_available(device: torch.device) -> bool:
    """bf16 autocast only where the hardware runs it natively."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        f = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(f()) if f is not None else False
        except Exception:  # noqa: BLE001 - an old build without the query: treat as unsupported
            return False
    return False


def wrap_loss(fn, device: torch.device, amp: bool = False):
    """Optionally run the image->loss function under bf16 autocast (loss returned in fp32)."""
    if not amp:
        return fn

    def amp_fn(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args).float()

    return amp_fn


def attack_items(rec, cat, items: Tensor, attack: Callable[[Callable, Tensor, Tensor], Tensor],
                 triples: ItemTriples, eps255: float, device: torch.device | str, batch_size: int, *,
                 loss=item_loss, amp: bool = False, channels_last: bool = False, pad: bool = False,
                 freeze: tuple = (), desc: str | None = None, progress: bool = False) -> Tensor:
    """The loop every catalogue attack runs: one adversarial uint8 image per item of ``items``.

    For each batch of ``batch_size`` items it builds the items' loss ``x -> [B]``
    (``item_loss_fn`` on their ``triples``, optionally under bf16 autocast) and calls
    ``attack(loss_fn, x, idx) -> x_adv`` on their clean images; the result is quantised to
    uint8 within ``eps255`` of the clean image (``quantize_within``). ``pad`` repeats the last
    item so that every batch has the same shape (one ``torch.compile`` graph). The recommender,
    its backbone (held by reference, not as a submodule) and ``freeze`` are frozen throughout.
    Returns uint8 [len(items), 3, S, S] on the CPU, in the order of ``items``.
    """
    device = torch.device(device)
    items = torch.as_tensor(items, dtype=torch.long).flatten()
    n, B = items.numel(), int(batch_size)
    out = torch.empty((n,) + tuple(cat.images.shape[1:]), dtype=torch.uint8)
    with frozen(rec, getattr(rec, "backbone", None), *freeze):
        bar = progress_bar(total=n, desc=desc or "attack", unit="item", enabled=progress)
        for s in range(0, n, B):
            idx = items[s:s + B]
            n_real = idx.numel()
            if pad and n_real < B:  # pad with the last item: fixed shapes, no recompiles
                idx = torch.cat([idx, idx[-1:].expand(B - n_real)])
            x = cat.item_batch(idx, device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            d = lambda t: t[idx].to(device)  # noqa: E731
            fn = wrap_loss(item_loss_fn(rec, idx.to(device), d(triples.users), d(triples.others),
                                        d(triples.sign), loss=loss), device, amp)
            x_adv = attack(fn, x, idx)
            out[s:s + n_real] = quantize_within(x_adv[:n_real].cpu(), cat.images[idx[:n_real]], eps255)
            bar.update(n_real)
        bar.close()
    return out


def step_params(method: str, eps255: float, cfg) -> tuple[float, int, float]:
    """(eps, steps, alpha) in pixel units for ``method`` (an L-inf member of ``ATTACKS``) from an
    AttackConfig (``pgd_steps``, ``pgd_alpha`` in /255, 0: Madry et al.'s 2.5 eps / steps)."""
    ATTACKS.check(method, "attack.untargeted", ball="linf")
    eps, steps = float(eps255) / 255.0, int(cfg.pgd_steps)
    return eps, steps, cfg.pgd_alpha / 255.0 if cfg.pgd_alpha > 0 else default_alpha(eps, steps)


def attack_catalogue(rec, cat, method: str, eps255: float, cfg, generator: torch.Generator,
                     device: torch.device | str = "cpu", progress: bool = True, *, compile: bool = False,
                     amp: bool = False, channels_last: bool = False, triples: ItemTriples | None = None,
                     batch_size: int | None = None, fast: bool | None = None,
                     items: Tensor | None = None) -> Tensor:
    """Attack the catalogue images of ``cat`` against ``rec``; returns uint8 [N,3,S,S] (CPU).

    method: an L-inf member of ``ATTACKS`` (fgsm, pgd); eps255: radius in /255 units; cfg: AttackConfig (pgd_steps,
    pgd_alpha, random_start, triples_per_item, triple_roles, loss, batch_size). ``attack.loss`` (an
    ``ATTACK_LOSSES`` member) picks the per-item objective and draws ``triples`` when none are
    given (given ones must come from the same member's ``targets``). ``items``: attack
    only these (default: every item; the result then has one row per given item). ``compile``:
    torch.compile the image->loss function (the last batch is padded so that shapes never
    change); ``amp``: bf16 autocast when ``amp_available``; ``fast`` (default
    ``cfg.fast_encoder``): attack a BN-folded channels_last copy of the model
    (``nn.fuse.fast_copy``). The result satisfies ``|adv - clean| <= eps255`` exactly in uint8
    (see ``quantize_within``).
    """
    eps, steps, alpha = step_params(method, eps255, cfg)
    optimiser, iterative = ATTACKS[method], ATTACKS.meta(method)["iterative"]
    device = torch.device(device)
    N = cat.n_items
    amp = amp and amp_available(device)
    fast = bool(getattr(cfg, "fast_encoder", False)) if fast is None else fast
    objective = ATTACK_LOSSES[getattr(cfg, "loss", "bpr")]
    if triples is None:
        triples = objective.targets(rec, cat, cfg.triples_per_item, generator, getattr(cfg, "triple_roles", "bpr"))
    seed_base = int(torch.randint(0, 2**62, (1,), generator=generator))

    def per_item_start(idx: Tensor, x: Tensor) -> Tensor:
        # one generator per item: the start does not depend on the batch the item falls in
        noise = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed_base + int(k)))
                             for k in idx])
        return x + (2 * noise.to(x) - 1) * eps

    def attack(fn, x: Tensor, idx: Tensor) -> Tensor:
        init = per_item_start(idx, x) if iterative and cfg.random_start else None
        return optimiser.craft(fn, x, eps, steps=steps, alpha=alpha, init=init)

    # fixed shapes (padded last batch): one compilation serves every batch and step
    loss = torch.compile(objective.item_loss, dynamic=False) if compile else objective.item_loss
    if fast:  # BN folded + NHWC copy (numerically the same model; see nn/fuse.py)
        rec = fast_copy(rec, cat.item_batch(torch.arange(min(4, N)), device), channels_last=True)
        channels_last = True
    return attack_items(rec, cat, torch.arange(N) if items is None else items, attack, triples, eps255, device,
                        int(batch_size or cfg.batch_size), loss=loss, amp=amp, channels_last=channels_last,
                        pad=compile, desc=f"attack {getattr(rec, 'name', 'rec')} {method} eps={eps255:g}",
                        progress=progress)


# the "train" objective: one image per item, crafted from training triples (what an uploader can do)
OBJECTIVES.register("train", attack_catalogue, per_user=False)
