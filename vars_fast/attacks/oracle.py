"""The evaluation-aware attacker (``attack.objective: eval``): the paper's protocol as its
numbers imply it.

The paper's Tables 2-3 put PGD's HR@10 on Amazon Men at 0.000, far below the ~0.099 of a
random ranking of 101 candidates. Only an attacker that pushes each user's *held-out*
positive down specifically gets there, so the paper's attack objective uses the evaluation
triples. This module reproduces that protocol: for every evaluated user u, each of u's
candidates (the held-out positive p and the sampled negatives n_1..n_C, ``cat.negatives[u]``)
gets its own perturbed image, crafted to maximise u's BPR loss over the evaluation triples

    L_u = 1/C sum_j softplus(-(y_up(x_p^u) - y_uj(x_j^u)))

so p's score goes down and every n_j's goes up. A user's ranking then uses only that user's
images. Per-user images are something no single uploaded image can realise: the result is an
oracle upper bound on the damage, not a threat an uploader poses. ``catalogue.py`` is the
realistic attacker (one image per item, crafted from training triples).

Cost: C + 1 images per user per attack, so the attack runs on a seeded subset of users
(``eval.oracle_users``); clean HR is reported on the same subset.

Layout of the images: ``[U, 1 + C, 3, S, S]`` uint8, slot 0 the positive, slot 1 + j the
j-th negative of ``cat.negatives[u]``; ``eval_lists`` gives the matching item ids.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.attacks.base import frozen, quantize_within
from vars_fast.attacks.untargeted import step_params
from vars_fast.metrics import hr_ndcg
from vars_fast.nn.fuse import fast_copy
from vars_fast.recommenders.base import batched_encode
from vars_fast.registry import ATTACKS, OBJECTIVES
from vars_fast.utils import progress as progress_bar


def oracle_users(cat, n: int, generator: torch.Generator) -> Tensor:
    """A seeded, sorted subset of ``n`` users that have a test item (all of them when n <= 0)."""
    has_test = (cat.test >= 0).nonzero().squeeze(1)
    if n <= 0 or n >= has_test.numel():
        return has_test
    pick = torch.randperm(has_test.numel(), generator=generator)[:n]
    return has_test[pick].sort().values


def eval_lists(cat, users: Tensor) -> Tensor:
    """Each user's evaluation list, int64 [U, 1 + C]: the held-out positive, then its negatives."""
    users = users.long().cpu()
    return torch.cat([cat.test[users].long().unsqueeze(1), cat.negatives[users].long()], dim=1)


def eval_triples(cat, users: Tensor) -> Tensor:
    """The evaluation triples (u, p, n_j) the oracle attacks, int64 [U, C, 3]."""
    lists = eval_lists(cat, users)
    U, C = lists.shape[0], lists.shape[1] - 1
    u = users.long().cpu().view(U, 1).expand(U, C)
    return torch.stack([u, lists[:, :1].expand(U, C), lists[:, 1:]], dim=2)


def list_loss(rec, x: Tensor, users: Tensor, lists: Tensor) -> Tensor:
    """Per-image loss [B*(1+C)] whose sum is sum_u L_u (module docstring).

    x [B*(1+C),3,S,S] holds B whole lists (user-major); users [B]; lists [B, 1+C]. A user's
    candidates are coupled by design (one user's list is one objective), so batches always
    hold whole lists. L_u sits in the positive's slot and the other slots carry 0, which
    keeps the ``Attack`` contract of one value per sample and the gradient of the sum exact.
    """
    B, L = lists.shape
    f = rec.encode(x)  # [B*L, F]
    s = rec.score(users.repeat_interleave(L), lists.reshape(-1), visual=f).float().view(B, L)
    loss_u = F.softplus(-(s[:, :1] - s[:, 1:])).mean(1)  # [B]
    out = torch.zeros(B, L, dtype=loss_u.dtype, device=loss_u.device)
    out[:, 0] = loss_u
    return out.view(-1)


def attack_eval_lists(rec, cat, users: Tensor, method: str, eps255: float, cfg, generator: torch.Generator,
                      device: torch.device | str = "cpu", progress: bool = True, *,
                      batch_images: Optional[int] = None, fast: Optional[bool] = None) -> Tensor:
    """Attack every evaluated user's candidate images; returns uint8 [U, 1 + C, 3, S, S] (CPU).

    method: an L-inf member of ``ATTACKS`` (fgsm, pgd); eps255 in /255 units; cfg: AttackConfig (pgd_steps, pgd_alpha,
    random_start, batch_size, fast_encoder). ``batch_images`` bounds the images per step
    (default ``cfg.batch_size``; at least one whole list). Each user's random start comes from
    its own seed, so the batch size does not change the result.
    """
    eps, steps, alpha = step_params(method, eps255, cfg)
    optimiser, iterative = ATTACKS[method], ATTACKS.meta(method)["iterative"]
    device = torch.device(device)
    users = users.long().cpu()
    lists = eval_lists(cat, users)
    U, L = lists.shape
    per_step = max(L, int(batch_images or cfg.batch_size))
    B = max(1, per_step // L)  # whole lists per batch
    seed_base = int(torch.randint(0, 2**62, (1,), generator=generator))
    out = torch.empty((U, L) + tuple(cat.images.shape[1:]), dtype=torch.uint8)
    fast = bool(getattr(cfg, "fast_encoder", False)) if fast is None else fast
    channels_last = False
    if fast:
        rec = fast_copy(rec, cat.item_batch(torch.arange(min(4, cat.n_items)), device), channels_last=True)
        channels_last = True
    with frozen(rec, getattr(rec, "backbone", None)):
        bar = progress_bar(total=U, desc=f"oracle {getattr(rec, 'name', 'rec')} {method} eps={eps255:g}",
                           unit="user", enabled=progress)
        for s in range(0, U, B):
            rows = torch.arange(s, min(s + B, U))
            li = lists[rows]
            x = cat.item_batch(li.reshape(-1), device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            u_dev, li_dev = users[rows].to(device), li.to(device)
            fn = lambda t: list_loss(rec, t, u_dev, li_dev)  # noqa: E731
            init = None
            if iterative and cfg.random_start:  # one generator per user: independent of the batch
                noise = torch.cat([torch.rand((L,) + tuple(x.shape[1:]),
                                              generator=torch.Generator().manual_seed(seed_base + int(users[r])))
                                   for r in rows])
                init = x + (2 * noise.to(x) - 1) * eps
            x_adv = optimiser.craft(fn, x, eps, steps=steps, alpha=alpha, init=init)
            clean = cat.images[li.reshape(-1)]
            out[rows] = quantize_within(x_adv.cpu(), clean, eps255).view(rows.numel(), L, *clean.shape[1:])
            bar.update(rows.numel())
        bar.close()
    return out


@torch.no_grad()
def list_scores(rec, users: Tensor, lists: Tensor, visual: Optional[Tensor] = None, chunk: int = 64) -> Tensor:
    """Scores [U, 1 + C] of each user's own list. ``visual`` [U, 1 + C, F]: the features of that
    user's own images (None: the clean catalogue's cached features)."""
    dev = rec.device if hasattr(rec, "device") else next(rec.parameters()).device
    out = []
    for s in range(0, users.shape[0], chunk):
        u, li = users[s:s + chunk].to(dev), lists[s:s + chunk].to(dev)
        v = None if visual is None else visual[s:s + chunk].to(dev, torch.float32).reshape(-1, visual.shape[-1])
        uu = u[:, None].expand_as(li).reshape(-1)
        out.append(rec.score(uu, li.reshape(-1), visual=v).float().view(li.shape).cpu())
    return torch.cat(out)


def list_ranking(rec, cat, users: Tensor, visual: Optional[Tensor] = None,
                 topk: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR/NDCG@N on the users' evaluation lists; ``visual`` as in ``list_scores``."""
    s = list_scores(rec, users.long(), eval_lists(cat, users), visual)
    return hr_ndcg(s[:, 0], s[:, 1:], topk)


def encode_lists(encode, images: Tensor, batch_size: int, device) -> Tensor:
    """uint8 [U, L, 3, S, S] -> features [U, L, F] with ``encode`` (images as [0,1] floats)."""
    U, L = images.shape[:2]
    with torch.no_grad():
        f = batched_encode(encode, images.reshape(U * L, *images.shape[2:]), batch_size, device,
                           show_progress=False)
    return f.view(U, L, f.shape[-1])


# the "eval" objective: per-user images crafted on each evaluated user's list (an oracle bound)
OBJECTIVES.register("eval", attack_eval_lists, per_user=True)
