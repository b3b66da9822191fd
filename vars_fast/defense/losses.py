"""The terms of the joint objective (Eq. 12): content (Eq. 6), perceptual (Eq. 5), the frozen
recommender's BPR loss on denoised images, and the contrastive InfoNCE (Eq. 8-10).

Every function returns a scalar averaged over the batch, so that the lambda weights of Eq. 12
do not depend on the batch size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.attacks import bpr_image_loss
from vars_fast.ops import info_nce

# Row blocks of the stacked embedding matrix handed to the contrastive loss:
# cat([z(x), z(x_adv), z(D(x)), z(D(x_adv))]), each block [n, d].
X, ADV, DX, DADV = 0, 1, 2, 3
POSITIVE_PAIRS = ((X, DX), (X, DADV), (DX, DADV))  # Eq. 8


def content_loss(x: Tensor, y: Tensor) -> Tensor:
    """Eq. 6: mean squared error between the clean x and the denoised y = D(x'); [B,3,H,W] each."""
    return F.mse_loss(y.float(), x.float())


def perceptual_loss(backbone, x: Tensor, y: Tensor, x_maps: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Eq. 5: sum_j ||phi_j(x) - phi_j(y)||^2 / (C_j H_j W_j), averaged over the batch.

    ``backbone.stages(x)`` gives the frozen maps phi_j (stages 2, 3, 4); the clean maps carry no
    gradient and can be passed precomputed as ``x_maps``. The mean over all elements of a map
    equals ||.||^2 / (C H W) averaged over the batch.
    """
    if x_maps is None:
        with torch.no_grad():
            x_maps = backbone.stages(x)
    y_maps = backbone.stages(y)
    return sum(F.mse_loss(b.float(), a.detach().float()) for a, b in zip(x_maps, y_maps))


def denoised_bpr_loss(rec, triples: Tensor, d_i: Tensor, d_j: Tensor) -> Tensor:
    """The recommender's BPR loss (Eq. 2 without the weight penalty, which is constant for a
    frozen model) with the items' visual features taken from the denoised images.

    triples [T,3] (u, i, j); d_i, d_j [T,3,S,S] the denoised images of items i and j.
    """
    return bpr_image_loss(rec, triples, d_i, d_j).float().mean()


def contrastive_pairs(n: int, share_negatives: bool = True, symmetric: bool = True,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index tensors for ``vars_fast.ops.info_nce`` over n items' four views.

    Candidates are the rows of cat([z(x), z(x_adv), z(D(x)), z(D(x_adv))]) ([4n, d]); item k's
    view v sits at row v*n + k. Returns ``(anchor_rows [P], positive_index [P], anchor_group [P],
    candidate_group [4n])``: anchor p is candidate row anchor_rows[p], its positive is row
    positive_index[p].

    * Positives (Eq. 8): (x, D(x)), (x, D(x_adv)), (D(x), D(x_adv)) of the same item; with
      ``symmetric`` each pair is used in both directions (6 anchors per item), so that no view
      is only ever pulled and never an anchor.
    * Negatives: the x_adv of the same item (Eq. 8, group = item index). With
      ``share_negatives`` (our default) every item's x_adv is a negative for every anchor
      (group -1): the detector must place *all* adversarial images away from clean and denoised
      ones, not just its own item's, and the extra negatives sharpen that signal at no cost.
    * Clean and denoised views are never negatives (group -2): two clean items of similar look
      must not be pushed apart, the detector is not an item discriminator.
    """
    items = torch.arange(n, device=device)
    pairs = list(POSITIVE_PAIRS) + ([(b, a) for a, b in POSITIVE_PAIRS] if symmetric else [])
    anchor_rows = torch.cat([a * n + items for a, _ in pairs])
    positive_index = torch.cat([b * n + items for _, b in pairs])
    anchor_group = items.repeat(len(pairs))
    candidate_group = torch.full((4 * n,), -2, dtype=torch.long, device=device)
    candidate_group[ADV * n:(ADV + 1) * n] = -1 if share_negatives else items
    return anchor_rows, positive_index, anchor_group, candidate_group


def contrastive_loss(z_x: Tensor, z_adv: Tensor, z_dx: Tensor, z_dadv: Tensor, temperature: float,
                     share_negatives: bool = True, symmetric: bool = True) -> Tensor:
    """Eq. 10: InfoNCE (Eq. 9, cosine similarity, temperature) summed over each item's positive
    pairs and averaged over items. z_*: [n, d] projections of x, x_adv, D(x), D(x_adv)."""
    n = z_x.shape[0]
    cands = torch.cat([z_x, z_adv, z_dx, z_dadv]).float()
    rows, pos, ag, cg = contrastive_pairs(n, share_negatives, symmetric, device=cands.device)
    loss = info_nce(cands[rows], cands, pos, ag, cg, temperature)
    return loss.sum() / n
