"""The contrastive detector of Sec. 3.4: encoder f + projection head g (Eq. 7).

    h = f(x)                       a trainable copy of the configured backbone up to global pooling
    z = W2 ReLU(W1 h)              proj_hidden -> proj_dim (128 in the paper)
    score(x) = ||z(x) - z(D(x))||_2   on L2-normalised z

Choices that are ours:

* ``embed`` returns L2-normalised z. The InfoNCE objective (Eq. 9) only sees cosine
  similarities, so the norm of z is never trained and a raw Euclidean distance would mix an
  arbitrary scale into the score; on the unit sphere the distance is a monotone function of
  the trained cosine (d^2 = 2 - 2 cos) and lies in [0, 2], which keeps the threshold stable.
* The encoder's batch-norm layers stay in eval mode while its weights train: a batch holds
  clean, adversarial and denoised views of the same items, whose statistics are not those
  of any input the detector sees at test time; the ImageNet statistics are kept instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig


class Detector(nn.Module):
    """``embed(x [B,3,S,S] in [0,1]) -> z [B, proj_dim]`` (unit norm).

    Args:
        backbone: the backbone config as a dict (``BackboneConfig`` fields); used to build the
            encoder when ``encoder`` is not given (with ``weights="none"`` when a state dict is
            about to be loaded, see ``load_defense``).
        proj_hidden, proj_dim: widths of the projection head.
        encoder: an existing module with ``features(x) -> [B, F]`` and ``feature_dim`` (e.g.
            ``Backbone.trainable_copy()``), used instead of building one.
    """

    def __init__(self, backbone: dict, proj_hidden: int = 512, proj_dim: int = 128,
                 encoder: Optional[nn.Module] = None):
        super().__init__()
        self._kwargs = dict(backbone=dict(backbone), proj_hidden=int(proj_hidden), proj_dim=int(proj_dim))
        if encoder is None:
            encoder = build_backbone(BackboneConfig(**backbone))
            encoder = encoder.trainable_copy() if hasattr(encoder, "trainable_copy") else encoder
        encoder.requires_grad_(True)
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(int(encoder.feature_dim), proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden, proj_dim))

    def kwargs(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._kwargs.items()}

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.encoder.modules():  # see the module docstring: keep ImageNet BN statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def project(self, x: Tensor) -> Tensor:
        """Unnormalised z = g(f(x)), [B, proj_dim]."""
        return self.head(self.encoder.features(x))

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised z, [B, proj_dim]."""
        return F.normalize(self.project(x).float(), dim=1)

    def distance(self, x: Tensor, x_denoised: Tensor) -> Tensor:
        """||z(x) - z(D(x))||_2 per sample [B], given D(x); both views in one encoder pass."""
        z = self.embed(torch.cat([x, x_denoised]))
        return (z[: x.shape[0]] - z[x.shape[0]:]).norm(dim=1)

    forward = embed
