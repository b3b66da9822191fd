"""VBPR with bounded visual influence, and its exact certificate (beyond the paper; #22).

VBPR scores ŷ_ui = p_uᵀq_i + β_i + w_uᵀf̃_i with the user's effective visual weight
w_u = Eᵀp_u + β′ (``tied``; the θ_u part of p_u otherwise). Two changes bound what an image
can do:

* the visual feature is put on the unit sphere after VBPR's fixed normalisation,
  f̂ = f̃ / ‖f̃‖, whatever the image;
* w_u is capped in norm by reparametrisation, w̄_u = w_u · min(1, c / ‖w_u‖), with c =
  ``recommender.bounded.cap``: the cap holds at every step of training and in every checkpoint.

So the visual term w̄_uᵀf̂_i lies in [−‖w̄_u‖, ‖w̄_u‖] for ANY image of item i, and no change of
images, however large, moves a score by more than 2‖w̄_u‖ ≤ 2c. ``certified_metrics`` turns that
into certified HR@N, user by user and exactly: the test item at its worst (non-visual score −
‖w̄_u‖) against every candidate at its best (non-visual + ‖w̄_u‖), ties counted against the
test item as ``metrics.hr_ndcg`` does. It holds for any attacker, the paper's per-user `eval`
oracle included. ``certified_shift`` bounds the prediction shift (Eq. 13) of any targeted
attack the same way.

``AMR-bounded`` fine-tunes a trained VBPR-bounded with AMR's feature-space adversarial training:
the cap and the sphere stay, so the same certificate holds for its weights.

There is no bounded DVBPR, on purpose: its score θ_uᵀΦ(x_i) is visual only, so with Φ̂ on the
sphere and ‖θ_u‖ ≤ c the test item's worst (−c) is below every candidate's best (+c) for every
user, and its certified HR@N is exactly 0 for any cap (at c = 0 every score ties, which counts
against the test item). A certificate needs a part of the score that no image moves (p_uᵀq_i +
β_i here); DVBPR with one would be this model with a trained CNN in place of the fixed backbone.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.metrics import hr_ndcg
from vars_fast.recommenders.amr import AMR
from vars_fast.recommenders.vbpr import VBPR
from vars_fast.registry import RECOMMENDERS


@RECOMMENDERS.register()
class BoundedVBPR(VBPR):
    name = "VBPR-bounded"
    train_order = 2
    robustness_label = "bounded"  # its rows' ``defense`` in the robustness list

    @classmethod
    def config_kwargs(cls, rc) -> dict:
        return {**super().config_kwargs(rc), "cap": rc.bounded.cap}

    def __init__(self, *args, cap: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not cap > 0:
            raise ValueError(f"recommender.bounded.cap must be > 0 (got {cap})")
        self.cap = float(cap)
        self.kwargs.update(cap=self.cap)

    # ---- the bounded visual path
    def unit(self, f: Tensor) -> Tensor:
        """Raw features [..., F] -> f̂ on the unit sphere (after the fixed normalisation)."""
        return F.normalize(self.transform(f), dim=-1)

    def visual_weight(self, p: Tensor) -> Tensor:
        """The capped effective visual weight w̄_u [..., F] of user rows p [..., K(+K')]."""
        pv = p if self.tied else p[..., self.k:]
        w = pv @ self.E
        if self.biases:
            w = w + self.beta_visual
        n = w.norm(dim=-1, keepdim=True)
        return w * torch.clamp(self.cap / n.clamp_min(1e-12), max=1.0)

    def visual_bound(self, users: Tensor) -> Tensor:
        """‖w̄_u‖ [B]: the most any image can add to or take from user u's score of any item."""
        return self.visual_weight(self.P[users]).norm(dim=-1)

    def nonvisual(self, p: Tensor, items: Tensor) -> Tensor:
        """p_uᵀq_i + β_i for user rows p (broadcastable to items' shape + (K,))."""
        pk = p if self.tied else p[..., :self.k]
        s = (pk * self.Q[items]).sum(-1)
        return s + self.beta_item[items] if self.biases else s

    def _bounded(self, p: Tensor, items: Tensor, fhat: Tensor) -> Tensor:
        return self.nonvisual(p, items) + (self.visual_weight(p) * fhat).sum(-1)

    # ---- scoring (every path goes through _bounded)
    def _score(self, users: Tensor, items: Tensor, visual: Optional[Tensor]) -> Tensor:
        return self._bounded(self.P[users], items, self.unit(visual))

    def score_normed(self, users: Tensor, items: Tensor, ft: Tensor) -> Tensor:
        return self._bounded(self.P[users], items, F.normalize(ft, dim=-1))

    def score_catalogue(self, users: Tensor, items: Tensor, visual_all: Optional[Tensor] = None) -> Tensor:
        fhat = self.unit(self.item_visual if visual_all is None else visual_all)
        p = self.P[users] if items.dim() == 1 else self.P[users][:, None]
        return self._bounded(p, items, fhat[items])

    def loss(self, triples: Tensor) -> Tensor:
        u, ij = triples[:, 0], triples[:, 1:]
        items, inv = torch.unique(ij, return_inverse=True)
        fhat = self.unit(self.item_visual[items])[inv]  # [B, 2, F]
        p, q = self.P[u], self.Q[ij]
        s = self._bounded(p[:, None], ij, fhat)
        b = self.beta_item[ij] if self.biases else None
        return F.softplus(s[:, 1] - s[:, 0]).mean() + self._reg(p, q, b)


@RECOMMENDERS.register()
class BoundedAMR(AMR, BoundedVBPR):
    """AMR's adversarial fine-tuning (amr.py) of a trained VBPR-bounded: the cap and the unit
    sphere stay, so the certificate is the same function of the fine-tuned weights; AMR's Δ
    (norm ``recommender.amr.eps``) is added to the unit feature f̂ and the sum goes back onto the
    sphere, which is all the scorer can see of any image."""

    name = "AMR-bounded"
    base = BoundedVBPR.name

    def perturbed_space(self, f: Tensor) -> Tensor:
        return self.unit(f)


@torch.no_grad()
def certified_metrics(rec: BoundedVBPR, cat, topk: Sequence[int] = (5, 10, 20), chunk_users: int = 1024) -> dict:
    """Certified HR/NDCG@N on ``cat``'s test items and negatives (those ``ranking_metrics``
    uses): what the model keeps whatever every image of the catalogue becomes."""
    device = rec.device
    test, negs = cat.test.to(device), cat.negatives.to(device)
    users = torch.arange(test.shape[0], device=device)
    keep = test >= 0
    users, test, negs = users[keep], test[keep], negs[keep]
    pos, neg = [], []
    for s in range(0, users.shape[0], chunk_users):
        u = users[s:s + chunk_users]
        p, b = rec.P[u], rec.visual_bound(u)
        pos.append((rec.nonvisual(p, test[s:s + chunk_users]) - b).float().cpu())
        neg.append((rec.nonvisual(p[:, None], negs[s:s + chunk_users]) + b[:, None]).float().cpu())
    return hr_ndcg(torch.cat(pos), torch.cat(neg), topk)


@torch.no_grad()
def certified_shift(rec: BoundedVBPR, targets: Tensor) -> float:
    """The largest mean prediction shift (Eq. 13: the mean over users and targets of ŷ_after −
    ŷ_before) that any change of the targets' images can cause: each user's visual term of a
    target can rise from its clean value w̄_uᵀf̂_t to at most ‖w̄_u‖."""
    fhat = rec.unit(rec.item_visual[targets.to(rec.device)])  # [T, F]
    w = rec.visual_weight(rec.P)  # [U, F]
    return float((w.norm(dim=1, keepdim=True) - w @ fhat.t()).mean())
