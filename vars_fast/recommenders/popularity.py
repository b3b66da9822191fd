"""Most-popular baseline: ŷ_ui = number of training interactions of item i (same for every user)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vars_fast.recommenders.base import Recommender
from vars_fast.registry import RECOMMENDERS


@RECOMMENDERS.register()
class Pop(Recommender):
    name = "Pop"
    uses_images = False
    train_order = 0

    @classmethod
    def from_config(cls, n_users, n_items, rc=None, backbone=None, feature_dim=None):
        return cls(n_users, n_items)

    def __init__(self, n_users: int, n_items: int):
        super().__init__(n_users, n_items)
        self.register_buffer("counts", torch.zeros(n_items))

    def _score(self, users: Tensor, items: Tensor, visual: Optional[Tensor]) -> Tensor:
        return self.counts[items]

    def fit(self, cat, cfg=None, generator=None, show_progress: bool = True, log=None) -> list[float]:
        """Count training interactions per item (ties between equal counts stay ties)."""
        self.counts.copy_(torch.bincount(cat.train[:, 1].cpu(), minlength=self.n_items).float())
        return []
