"""Transfer attack from a surrogate backbone: a feature-space PGD crafted on a network the
defence never saw (e.g. a ResNet18 where the recommender and the detector use
EfficientNet-Lite0).

The attacker maximises ``||phi'(x + delta) - phi'(x)||_2^2`` over the L-inf ball, with
``phi'`` the surrogate's pooled features (Backbone.features): a recommender-agnostic
objective that moves the image's representation as far as the budget allows, and whose
perturbation pattern comes from another architecture. The squared distance has zero gradient
at ``delta = 0``, so the attack needs its random start (``PGD(random_start=True)``, seeded
by the generator). The attack itself is ``vars_fast.attacks.pgd.PGD``; this module builds
its loss and the surrogate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vars_fast.attacks.base import frozen
from vars_fast.attacks.pgd import PGD
from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig


def feature_shift_loss(surrogate, x_clean: Tensor):
    """``x [B,3,S,S] -> ||phi'(x) - phi'(x_clean)||_2^2 [B]`` with ``phi' = surrogate.features``."""
    with torch.no_grad():
        ref = surrogate.features(x_clean).float()

    def loss_fn(x: Tensor) -> Tensor:
        return (surrogate.features(x).float() - ref).pow(2).sum(1)

    return loss_fn


def build_surrogate(name: str = "resnet18", weights: str = "none", device: torch.device | str = "cpu"):
    """The surrogate backbone (frozen, eval). ``weights``: "none" (random init), "pretrained"
    (the torchvision cache; never downloads) or a local state-dict path, as ``backbone.weights``."""
    bb = build_backbone(BackboneConfig(name=name, weights=weights, input_size=0))
    return bb.to(device).eval().requires_grad_(False)


def transfer_attack(surrogate, x: Tensor, eps: float, steps: int = 10, generator: torch.Generator | None = None,
                    alpha: float | None = None) -> Tensor:
    """x [B,3,S,S] in [0,1] -> x_adv with ``|x_adv - x| <= eps`` (pixel units), crafted on ``surrogate``."""
    with frozen(surrogate):
        return PGD(feature_shift_loss(surrogate, x), eps, alpha=alpha, steps=steps, random_start=True,
                   generator=generator)(x)
