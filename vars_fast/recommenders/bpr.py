"""BPR-MF (Rendle et al. 2009): ŷ_ui = p_uᵀ q_i [+ β_i], no visual features (the no-image baseline)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.recommenders.base import Recommender, fit_bpr, sq
from vars_fast.registry import RECOMMENDERS


@RECOMMENDERS.register()
class BPR(Recommender):
    name = "BPR"
    uses_images = False
    selectable = True
    train_order = 1

    @classmethod
    def from_config(cls, n_users, n_items, rc, backbone=None, feature_dim=None):
        return cls(n_users, n_items, k=rc.k, biases=rc.biases, reg=rc.weight_decay, init_std=rc.init_std)

    def __init__(self, n_users: int, n_items: int, k: int = 64, biases: bool = True, reg: float = 1e-4,
                 init_std: float = 0.01):
        super().__init__(n_users, n_items, k=int(k), biases=bool(biases), reg=float(reg), init_std=float(init_std))
        self.biases, self.reg_lambda = bool(biases), float(reg)
        self.P = nn.Parameter(torch.randn(n_users, k) * init_std)
        self.Q = nn.Parameter(torch.randn(n_items, k) * init_std)
        if self.biases:
            self.beta_item = nn.Parameter(torch.zeros(n_items))

    def _score(self, users: Tensor, items: Tensor, visual: Optional[Tensor]) -> Tensor:
        s = (self.P[users] * self.Q[items]).sum(-1)
        return s + self.beta_item[items] if self.biases else s

    def reg(self, triples: Tensor) -> Tensor:
        u, ij = triples[:, 0], triples[:, 1:]
        return self._reg(self.P[u], self.Q[ij], self.beta_item[ij] if self.biases else None)

    def _reg(self, p: Tensor, q: Tensor, b: Optional[Tensor]) -> Tensor:
        """λ_Θ on the gathered rows p_u [B,K], (q_i, q_j) [B,2,K] and (β_i, β_j) [B,2]."""
        rows = sq(p) + sq(q).sum(-1)
        return self.reg_lambda * (rows + sq(b) if self.biases else rows).mean()

    def loss(self, triples: Tensor) -> Tensor:
        """BPR loss + λ_Θ, each table gathered once per step (see ``VBPR.loss``)."""
        u, ij = triples[:, 0], triples[:, 1:]
        p, q = self.P[u], self.Q[ij]
        b = self.beta_item[ij] if self.biases else None
        s = (p[:, None] * q).sum(-1) + (b if self.biases else 0)  # [B, 2]: (ŷ_ui, ŷ_uj)
        return F.softplus(s[:, 1] - s[:, 0]).mean() + self._reg(p, q, b)

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None, **kw) -> list[float]:
        """``kw``: ``holdout`` / ``record`` for ``fit_bpr`` (model selection)."""
        return fit_bpr(self, cat, cfg, self.loss, generator, epochs=cfg.epochs, lr=cfg.lr, lr_low=cfg.lr_low,
                       batch_size=cfg.batch_size, show_progress=show_progress, log=log, **kw)
