"""DVBPR (Kang et al. 2017): a CNN Φ trained end to end with the recommender, ŷ_ui = θ_uᵀ Φ(x_i).

Φ is small and trained from scratch (Kang et al.'s CNN-F is ~40 M parameters; this one is
four stride-2 conv blocks of width w, 2w, 4w, 4w + global pooling + a linear map to K) on
images area-downsampled to ``dvbpr_input_size`` (32 px: 4x cheaper than 64 px), so that it
trains in a minute on a CPU. Per step, Φ runs once on the *distinct* items of the batch's
triples; small batches (``dvbpr_batch_size`` 256) therefore buy more CNN updates for the same
number of encoded images. After training, ``item_visual`` caches Φ of the clean catalogue
(BatchNorm in eval mode), and ``encode`` is the differentiable image → Φ path for attacks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.distributed import ddp
from vars_fast.recommenders.base import Recommender, encode_catalogue, sq, train_bpr


class SmallCNN(nn.Module):
    """[B,3,S,S] in [0,1] -> [B, k]; normalises its own input like the backbones do."""

    def __init__(self, width: int = 32, k: int = 64, input_size: int = 0):
        super().__init__()
        self.input_size = int(input_size)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], k)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_size and x.shape[-1] > self.input_size:
            # area downsampling: differentiable, alias-free for integer factors
            x = F.adaptive_avg_pool2d(x, self.input_size)
        return self.head(self.body((x - 0.5) / 0.25).mean(dim=(2, 3)))


class DVBPR(Recommender):
    name = "DVBPR"
    uses_images = True

    def __init__(self, n_users: int, n_items: int, k: int = 64, width: int = 32, reg: float = 1e-4,
                 init_std: float = 0.01, input_size: int = 0):
        super().__init__(n_users, n_items, k=int(k), width=int(width), reg=float(reg), init_std=float(init_std),
                         input_size=int(input_size))
        self.reg_lambda = float(reg)
        self.theta = nn.Parameter(torch.randn(n_users, k) * init_std)
        self.cnn = SmallCNN(width, k, input_size)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B,3,S,S] in [0,1] -> Φ(x) [B, K] (differentiable in images)."""
        return self.cnn(images)

    def _score(self, users: Tensor, items: Tensor, visual: Tensor) -> Tensor:
        return (self.theta[users] * visual).sum(-1)

    def score_catalogue(self, users: Tensor, items: Tensor, visual_all: Optional[Tensor] = None) -> Tensor:
        if items.dim() == 2:
            users = users[:, None].expand_as(items)
        return self._score(users, items, (self.item_visual if visual_all is None else visual_all)[items])

    def reg(self, triples: Tensor) -> Tensor:
        dense = sum(p.pow(2).sum() for p in self.cnn.parameters())
        return self.reg_lambda * (sq(self.theta[triples[:, 0]]).mean() + dense / ddp.global_batch_size(triples.shape[0]))

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None,
            image_batch: int = 256) -> list[float]:
        """End-to-end training on the catalogue images, then cache Φ(clean catalogue)."""
        device = self.device

        def loss(triples: Tensor) -> Tensor:
            items, inv = torch.unique(triples[:, 1:], return_inverse=True)
            phi = self.encode(cat.item_batch(items.cpu(), device))  # [M, K]
            u = triples[:, 0]
            s_i = self._score(u, triples[:, 1], phi[inv[:, 0]])
            s_j = self._score(u, triples[:, 2], phi[inv[:, 1]])
            return F.softplus(s_j - s_i).mean() + self.reg(triples)

        hist = train_bpr(self, cat, loss, epochs=cfg.dvbpr_epochs, lr=cfg.dvbpr_lr, lr_low=cfg.dvbpr_lr * 0.1,
                         lr_drop_frac=cfg.lr_drop_frac, batch_size=cfg.dvbpr_batch_size, generator=generator,
                         desc=self.name, show_progress=show_progress, log=log, threads=cfg.threads)
        self.set_item_visual(encode_catalogue(self, cat.images, image_batch, device, show_progress))
        return hist
