"""VBPR (He & McAuley 2016) in the paper's form: ŷ_ui = p_uᵀ(q_i + E f̃_i) [+ β_i + β'ᵀ f̃_i].

f_i is the frozen backbone's pooled feature of item i's image; f̃_i = (f_i - μ) / s is a fixed
affine normalisation fitted once on the *clean* catalogue (μ: per-dimension mean, s: mean L2
norm of the centred features) and stored in the model, so features of attacked or denoised
images go through exactly the same transform. Why: EfficientNet-Lite0 features are 1280-d,
non-negative (ReLU6) and share a large common component; centring removes that component
(it would only act as a global item bias) and the scalar scale makes ‖f̃‖ ≈ 1 so that E's
learning rate and λ_Θ mean the same for any backbone (2048-d ResNet50 or 1280-d Lite0).
``tied=False`` gives the original VBPR split p_u = [γ_u; θ_u], ŷ = γ_uᵀγ_i + θ_uᵀE f̃_i.

The backbone is held by reference, not registered as a submodule: it is shared by every
model and never stored in recommender checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.distributed import ddp
from vars_fast.recommenders.base import Recommender, fit_bpr, sq


class VBPR(Recommender):
    name = "VBPR"
    uses_images = True

    def __init__(self, n_users: int, n_items: int, feature_dim: int, k: int = 64, visual_k: int = 64,
                 tied: bool = True, biases: bool = True, reg: float = 1e-4, reg_visual: float = 0.0,
                 init_std: float = 0.01, feature_norm: str = "center_scale", backbone: Optional[nn.Module] = None):
        super().__init__(n_users, n_items, feature_dim=int(feature_dim), k=int(k), visual_k=int(visual_k),
                         tied=bool(tied), biases=bool(biases), reg=float(reg), reg_visual=float(reg_visual),
                         init_std=float(init_std), feature_norm=str(feature_norm))
        self.k, self.tied, self.biases = int(k), bool(tied), bool(biases)
        self.reg_lambda, self.reg_visual = float(reg), float(reg_visual)
        self.feature_norm = feature_norm
        kv = self.k if self.tied else int(visual_k)
        self.P = nn.Parameter(torch.randn(n_users, self.k + (0 if self.tied else kv)) * init_std)
        self.Q = nn.Parameter(torch.randn(n_items, self.k) * init_std)
        # E is [K, F]: uniform like nn.Linear's default so that E f̃ ~ 1/sqrt(3F) per unit norm
        self.E = nn.Parameter((torch.rand(kv, feature_dim) * 2 - 1) / feature_dim ** 0.5)
        if self.biases:
            self.beta_item = nn.Parameter(torch.zeros(n_items))
            self.beta_visual = nn.Parameter(torch.zeros(feature_dim))
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_scale", torch.ones(()))
        object.__setattr__(self, "backbone", backbone)  # a reference, not a submodule

    # ---- visual path
    def attach_backbone(self, backbone: nn.Module) -> None:
        object.__setattr__(self, "backbone", backbone)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B,3,S,S] in [0,1] -> raw backbone features [B, F] (differentiable in images)."""
        if self.backbone is None:
            raise RuntimeError(f"{self.name}: no backbone attached (load_recommender(..., backbone=...))")
        return self.backbone.features(images)

    @torch.no_grad()
    def fit_feature_norm(self, feats: Tensor) -> None:
        """Fix μ and s from clean features [N, F] (see the module docstring)."""
        feats = feats.to(self.feat_mean.device, torch.float32)
        if self.feature_norm == "none":
            self.feat_mean.zero_()
            self.feat_scale.fill_(1.0)
            return
        if self.feature_norm != "center_scale":
            raise ValueError(f"recommender.feature_norm: unknown {self.feature_norm!r} (center_scale | none)")
        self.feat_mean.copy_(feats.mean(0))
        self.feat_scale.copy_((feats - self.feat_mean).norm(dim=1).mean().clamp_min(1e-8))

    def transform(self, f: Tensor) -> Tensor:
        """Raw features [..., F] -> normalised f̃ [..., F]."""
        return (f - self.feat_mean) / self.feat_scale

    # ---- scoring
    def _score(self, users: Tensor, items: Tensor, visual: Optional[Tensor]) -> Tensor:
        return self.score_normed(users, items, self.transform(visual))

    def score_catalogue(self, users: Tensor, items: Tensor, visual_all: Optional[Tensor] = None) -> Tensor:
        """Scores with an [N, F] feature table: E f̃ and β'ᵀf̃ once per item, then gathered
        (ranking 600 users x 101 candidates: 800 projections instead of 60,600)."""
        if items.dim() == 2:
            users = users[:, None].expand_as(items)
        ft = self.transform(self.item_visual if visual_all is None else visual_all)
        vb = ft @ self.beta_visual if self.biases else None
        return self._combine(users, items, (ft @ self.E.t())[items], None if vb is None else vb[items])

    def score_normed(self, users: Tensor, items: Tensor, ft: Tensor) -> Tensor:
        """ŷ from already-normalised features f̃ (shape items.shape + (F,)); AMR perturbs here."""
        vb = ft @ self.beta_visual if self.biases else None
        return self._combine(users, items, ft @ self.E.t(), vb)

    def _combine(self, users: Tensor, items: Tensor, ef: Tensor, vb: Optional[Tensor]) -> Tensor:
        """ŷ from the visual projections ef = E f̃ [..., K'] and vb = β'ᵀ f̃ [...]."""
        p, q = self.P[users], self.Q[items]
        if self.tied:
            s = (p * (q + ef)).sum(-1)
        else:
            s = (p[..., :self.k] * q).sum(-1) + (p[..., self.k:] * ef).sum(-1)
        if self.biases:
            s = s + self.beta_item[items] + vb
        return s

    def reg(self, triples: Tensor) -> Tensor:
        u, i, j = triples.unbind(1)
        rows = sq(self.P[u], self.Q[i], self.Q[j])
        dense = self.E.pow(2).sum()
        if self.biases:
            rows = rows + sq(self.beta_item[i], self.beta_item[j])
            dense = dense + self.beta_visual.pow(2).sum()
        # dense weights are touched by every triple: penalise them once per batch (Cornac's VBPR)
        lam_v = self.reg_visual or self.reg_lambda
        # per-batch term: divide by the GLOBAL batch so N ranks match one process (DDP)
        return self.reg_lambda * rows.mean() + lam_v * dense / ddp.global_batch_size(triples.shape[0])

    # ---- training
    def loss(self, triples: Tensor) -> Tensor:
        """Training loss on clean features. E f̃ is computed once per *distinct* item of the batch
        (~700 of 2048 rows for a 1024-triple batch on 800 items), then gathered."""
        u, i, j = triples.unbind(1)
        items, inv = torch.unique(triples[:, 1:], return_inverse=True)
        ft = self.transform(self.item_visual[items])
        ef = ft @ self.E.t()
        vb = ft @ self.beta_visual if self.biases else ft.new_zeros(ft.shape[0])
        s_i = self._combine(u, i, ef[inv[:, 0]], vb[inv[:, 0]])
        s_j = self._combine(u, j, ef[inv[:, 1]], vb[inv[:, 1]])
        return F.softplus(s_j - s_i).mean() + self.reg(triples)

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None,
            features: Optional[Tensor] = None) -> list[float]:
        """Train on ``cat`` with the clean features (``features`` [N,F] or the cached item_visual)."""
        if features is not None:
            self.set_item_visual(features)
        if self.item_visual is None:
            raise RuntimeError("VBPR.fit: pass features= (clean backbone features [N, F])")
        self.fit_feature_norm(self.item_visual)
        return fit_bpr(self, cat, cfg, self.loss, generator, epochs=cfg.epochs, lr=cfg.lr, lr_low=cfg.lr_low,
                       batch_size=cfg.batch_size, show_progress=show_progress, log=log)
