"""AMR (Tang et al. 2020): adversarial training of VBPR on the item feature vectors.

Fine-tunes a trained VBPR for ``recommender.amr.epochs`` on L(f̃) + λ_adv · L(f̃ + Δ), with the fast
worst-case perturbation Δ = ε · ∇_f̃ L / ‖∇_f̃ L‖ computed per item row (positive and
negative item of each triple) and held constant (no gradient through Δ).
Δ lives in VBPR's normalised feature space, where ‖f̃‖ ≈ 1 on average (see vbpr.py), so
``recommender.amr.eps`` is a fraction of the typical feature norm (0.5 by default), whatever the backbone.
Scoring is VBPR's: AMR only changes the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.recommenders.base import train_bpr
from vars_fast.recommenders.vbpr import VBPR
from vars_fast.registry import RECOMMENDERS


@RECOMMENDERS.register()
class AMR(VBPR):
    name = "AMR"
    selectable = False  # fine-tunes the selected VBPR
    base = "VBPR"
    train_order = 3

    @classmethod
    def config_kwargs(cls, rc) -> dict:
        return {**super().config_kwargs(rc), "amr_eps": rc.amr.eps, "amr_lambda": rc.amr.lambda_adv}

    @classmethod
    def from_trained(cls, base: VBPR, rc) -> "AMR":
        return cls.from_vbpr(base, rc.amr.eps, rc.amr.lambda_adv)

    def __init__(self, *args, amr_eps: float = 0.5, amr_lambda: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.amr_eps, self.amr_lambda = float(amr_eps), float(amr_lambda)
        self.kwargs.update(amr_eps=self.amr_eps, amr_lambda=self.amr_lambda)

    @classmethod
    def from_vbpr(cls, vbpr: VBPR, amr_eps: float = 0.5, amr_lambda: float = 1.0) -> "AMR":
        """A copy of a trained VBPR (weights, feature normalisation, item_visual, backbone)."""
        kw = {k: v for k, v in vbpr.kwargs.items() if k not in ("n_users", "n_items")}
        amr = cls(vbpr.n_users, vbpr.n_items, amr_eps=amr_eps, amr_lambda=amr_lambda, **kw)
        amr.load_state_dict(vbpr.state_dict())
        amr.to(vbpr.device)
        amr.set_item_visual(vbpr.item_visual)
        amr.attach_backbone(vbpr.backbone)
        return amr

    def perturbed_space(self, f: Tensor) -> Tensor:
        """Raw features -> the representation Δ is added to (VBPR's f̃; ``score_normed`` reads it)."""
        return self.transform(f)

    def _pair_loss(self, triples: Tensor, fi: Tensor, fj: Tensor) -> Tensor:
        u, i, j = triples.unbind(1)
        return F.softplus(self.score_normed(u, j, fj) - self.score_normed(u, i, fi)).mean()

    def perturbation(self, triples: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(f̃_i, f̃_j, Δ_i, Δ_j) for triples [B,3]; each Δ row has L2 norm ε (0 where the gradient is 0)."""
        _, i, j = triples.unbind(1)
        fi, fj = self.perturbed_space(self.item_visual[i]), self.perturbed_space(self.item_visual[j])
        di = torch.zeros_like(fi, requires_grad=True)
        dj = torch.zeros_like(fj, requires_grad=True)
        gi, gj = torch.autograd.grad(self._pair_loss(triples, fi + di, fj + dj), (di, dj))
        unit = lambda g: g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        return fi, fj, self.amr_eps * unit(gi), self.amr_eps * unit(gj)

    def loss(self, triples: Tensor) -> Tensor:
        fi, fj, di, dj = self.perturbation(triples)
        clean = self._pair_loss(triples, fi, fj)
        adv = self._pair_loss(triples, fi + di, fj + dj)
        return clean + self.amr_lambda * adv + self.reg(triples)

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None,
            features: Tensor | None = None) -> list[float]:
        """Adversarial fine-tuning (the weights should come from a trained VBPR: ``from_vbpr``)."""
        if features is not None:
            self.set_item_visual(features)
        return train_bpr(self, cat, self.loss, epochs=cfg.amr.epochs, lr=cfg.amr.lr, lr_low=cfg.amr.lr,
                         lr_drop_frac=1.0, batch_size=cfg.amr.batch_size, generator=generator,
                         desc=self.name, show_progress=show_progress, log=log, threads=cfg.threads)
