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
from vars_fast.registry import RECOMMENDERS


@RECOMMENDERS.register()
class VBPR(Recommender):
    name = "VBPR"
    uses_images = True
    uses_features = True
    selectable = True
    train_order = 2

    @classmethod
    def config_kwargs(cls, rc) -> dict:
        """Constructor keywords from a ``RecommenderConfig``."""
        return dict(k=rc.k, visual_k=rc.visual_k, tied=rc.tied, biases=rc.biases, reg=rc.weight_decay,
                    reg_visual=rc.reg_visual, init_std=rc.init_std, feature_norm=rc.feature_norm)

    @classmethod
    def from_config(cls, n_users, n_items, rc, backbone=None, feature_dim=None):
        """E's width is the backbone's feature width (or ``feature_dim``)."""
        fdim = feature_dim or getattr(backbone, "feature_dim", None)
        if fdim is None:
            raise ValueError(f"{cls.name} needs a backbone (or feature_dim) to size E")
        return cls(n_users, n_items, fdim, **cls.config_kwargs(rc), backbone=backbone)

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
        """Scores with an [N, F] feature table: E f̃ and β'ᵀ f̃ once per item, then gathered
        (ranking 600 users x 101 candidates: 800 projections instead of 60,600).

        The early-stopping validation pays one call per epoch (see ``_project``)."""
        ef, vb = self._project(self.item_visual if visual_all is None else visual_all)
        bias = self.beta_item[items] + vb[items] if self.biases else None
        p = self.P[users] if items.dim() == 1 else self.P[users][:, None]  # [B, 1, K] broadcasts over candidates
        return self._rows(p, self.Q[items], ef[items], bias)

    def _project(self, f: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Raw features [M, F] -> (E f̃ [M, K'], β'ᵀ f̃ [M] or None) in one product.

        The normalisation is applied after the product, W f̃ = (W f - W μ) / s: one pass over the
        features instead of three (16k items: ~50 ms instead of ~150 ms), equal to rounding."""
        w = torch.cat([self.E, self.beta_visual[None]]) if self.biases else self.E
        proj = (f @ w.t() - self.feat_mean @ w.t()) / self.feat_scale
        return (proj[:, :-1], proj[:, -1]) if self.biases else (proj, None)

    def score_normed(self, users: Tensor, items: Tensor, ft: Tensor) -> Tensor:
        """ŷ from already-normalised features f̃ (shape items.shape + (F,)); AMR perturbs here."""
        vb = ft @ self.beta_visual if self.biases else None
        return self._combine(users, items, ft @ self.E.t(), vb)

    def _combine(self, users: Tensor, items: Tensor, ef: Tensor, vb: Optional[Tensor]) -> Tensor:
        """ŷ from the visual projections ef = E f̃ [..., K'] and vb = β'ᵀ f̃ [...]."""
        bias = self.beta_item[items] + vb if self.biases else None
        return self._rows(self.P[users], self.Q[items], ef, bias)

    def _rows(self, p: Tensor, q: Tensor, ef: Tensor, bias: Optional[Tensor]) -> Tensor:
        """ŷ from gathered rows: p_u, q_i [..., K], E f̃_i [..., K'] and β_i + β'ᵀ f̃_i [...]."""
        if self.tied:
            s = (p * (q + ef)).sum(-1)
        else:
            s = (p[..., :self.k] * q).sum(-1) + (p[..., self.k:] * ef).sum(-1)
        return s if bias is None else s + bias

    def reg(self, triples: Tensor) -> Tensor:
        u, ij = triples[:, 0], triples[:, 1:]
        return self._reg(self.P[u], self.Q[ij], self.beta_item[ij] if self.biases else None)

    def _reg(self, p: Tensor, q: Tensor, b: Optional[Tensor]) -> Tensor:
        """λ_Θ on the gathered rows p_u [B,K], (q_i, q_j) [B,2,K], (β_i, β_j) [B,2], plus the dense
        E and β' once per batch."""
        rows = sq(p) + sq(q).sum(-1)
        dense = self.E.pow(2).sum()
        if self.biases:
            rows = rows + sq(b)
            dense = dense + self.beta_visual.pow(2).sum()
        # dense weights are touched by every triple: penalise them once per batch (Cornac's VBPR)
        lam_v = self.reg_visual or self.reg_lambda
        # per-batch term: divide by the GLOBAL batch so N ranks match one process (DDP)
        return self.reg_lambda * rows.mean() + lam_v * dense / ddp.global_batch_size(p.shape[0])

    # ---- training
    def loss(self, triples: Tensor) -> Tensor:
        """Training loss on clean features. E f̃ is computed once per *distinct* item of the batch
        (~700 of 2048 rows for a 1024-triple batch on 800 items), then gathered.

        Each table is gathered once per step: the backward of a gather zero-fills a gradient the
        size of the whole table, and with Q and β gathered once per use (7 times) those fills were
        half of a step on the 16k-item sparse preset (docs/results/recommender_tuning.md)."""
        u, ij = triples[:, 0], triples[:, 1:]
        items, inv = torch.unique(ij, return_inverse=True)
        ef, vb = self._project(self.item_visual[items])
        p, q = self.P[u], self.Q[ij]
        b = self.beta_item[ij] if self.biases else None
        bias = b + vb[inv] if self.biases else None
        s = self._rows(p[:, None], q, ef[inv], bias)  # [B, 2]: (ŷ_ui, ŷ_uj)
        return F.softplus(s[:, 1] - s[:, 0]).mean() + self._reg(p, q, b)

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None,
            features: Optional[Tensor] = None, **kw) -> list[float]:
        """Train on ``cat`` with the clean features (``features`` [N,F] or the cached item_visual);
        ``kw``: ``holdout`` / ``record`` for ``fit_bpr`` (model selection)."""
        if features is not None:
            self.set_item_visual(features)
        if self.item_visual is None:
            raise RuntimeError("VBPR.fit: pass features= (clean backbone features [N, F])")
        self.fit_feature_norm(self.item_visual)
        return fit_bpr(self, cat, cfg, self.loss, generator, epochs=cfg.epochs, lr=cfg.lr, lr_low=cfg.lr_low,
                       batch_size=cfg.batch_size, show_progress=show_progress, log=log, **kw)
