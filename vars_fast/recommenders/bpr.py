"""BPR-MF (Rendle et al. 2009): ŷ_ui = p_uᵀ q_i [+ β_i], no visual features (the no-image baseline)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vars_fast.recommenders.base import Recommender, bpr_loss, fit_bpr, sq


class BPR(Recommender):
    name = "BPR"
    uses_images = False

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
        u, i, j = triples.unbind(1)
        rows = sq(self.P[u], self.Q[i], self.Q[j])
        if self.biases:
            rows = rows + sq(self.beta_item[i], self.beta_item[j])
        return self.reg_lambda * rows.mean()

    def loss(self, triples: Tensor) -> Tensor:
        return bpr_loss(self, triples) + self.reg(triples)

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None) -> list[float]:
        return fit_bpr(self, cat, cfg, self.loss, generator, epochs=cfg.epochs, lr=cfg.lr, lr_low=cfg.lr_low,
                       batch_size=cfg.batch_size, show_progress=show_progress, log=log)
