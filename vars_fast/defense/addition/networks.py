"""ADDITION's two trained modules and its criterion: the noise-level network N_phi (stage 1,
noise injection), the FFDNet-like denoiser D_theta (stage 2, noise reduction), and the relative
score change Delta that decides (the package docstring has the method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NoiseLevelNet(nn.Module):
    """Noise-injection module: deep image features [B, F] -> noise level [B] in [sigma_min, sigma_max]."""

    def __init__(self, feature_dim: int, hidden: int = 64, sigma_min: float = 0.02, sigma_max: float = 0.2):
        super().__init__()
        if not 0.0 <= sigma_min < sigma_max:
            raise ValueError(f"noise range: need 0 <= sigma_min < sigma_max (got {sigma_min}, {sigma_max})")
        self._kwargs = {"feature_dim": int(feature_dim), "hidden": int(hidden), "sigma_min": float(sigma_min),
                        "sigma_max": float(sigma_max)}
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def kwargs(self) -> dict:
        return dict(self._kwargs)

    @torch.no_grad()
    def fit_normalisation(self, feats: Tensor) -> None:
        """Standardise inputs with the clean training items' feature statistics."""
        feats = feats.float().to(self.feat_mean.device)
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp_min(1e-6) if feats.shape[0] > 1 else torch.ones_like(self.feat_std))

    def forward(self, feats: Tensor) -> Tensor:
        h = (feats.float() - self.feat_mean) / self.feat_std
        return self.sigma_min + (self.sigma_max - self.sigma_min) * torch.sigmoid(self.mlp(h).squeeze(-1))


class NoiseReducer(nn.Module):
    """Noise-reduction module: (noisy image z [B,3,H,W], noise level [B]) -> image estimate.

    FFDNet-style: 2x pixel-unshuffle (12 channels at half resolution) plus a constant
    noise-level map, ``depth`` 3x3 convolutions, a predicted residual that is subtracted from
    z. Unclamped (training needs the gradient everywhere); ``Addition.process`` clamps."""

    def __init__(self, width: int = 48, depth: int = 5):
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"denoiser: need depth >= 2 and width >= 1 (got {depth}, {width})")
        self._kwargs = {"width": int(width), "depth": int(depth)}
        layers: list[nn.Module] = [nn.Conv2d(13, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 12, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def kwargs(self) -> dict:
        return dict(self._kwargs)

    def forward(self, z: Tensor, sigma: Tensor) -> Tensor:
        H, W = z.shape[-2:]
        zp = F.pad(z, (0, W % 2, 0, H % 2), mode="replicate") if (H % 2 or W % 2) else z
        u = F.pixel_unshuffle(zp, 2)
        m = sigma.to(u).view(-1, 1, 1, 1).expand(u.shape[0], 1, u.shape[2], u.shape[3])
        r = F.pixel_shuffle(self.body(torch.cat([u, m], 1)), 2)
        return (zp - r)[..., :H, :W]


def relative_change(s_new: Tensor, s_ref: Tensor) -> Tensor:
    """Delta = sum_u |s_new - s_ref| / sum_u |s_ref| per row of [B, U] score tables -> [B]."""
    return (s_new - s_ref).abs().sum(-1) / s_ref.abs().sum(-1).clamp_min(1e-8)
