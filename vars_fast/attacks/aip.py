"""Adversarial item promotion (Liu and Larson, 2021, "Adversarial Item Promotion:
Vulnerabilities at the Core of Top-N Recommenders that Use Images to Address Cold Start").

Two of the paper's attacks (the third, the semantic attack, is a manual photo edit):

* **INSA** (insider): the attacker knows the user embeddings and maximises the target's
  mean score over all users, ``(1/|U|) sum_u y_ut``, by perturbing the target's image.
* **EXPA** (expert): the attacker owns the feature extractor and picks a popular "hook"
  item; the target image is perturbed so that its visual feature moves toward the hook's:
  maximise ``-||f(x_t) - f_hook||^2``.

Both are optimised with PGD in the L-inf ball (AIP's own optimiser is iterative sign
gradient ascent); these functions only build the ``loss_fn`` the attacks maximise.
"""
from __future__ import annotations

from torch import Tensor

from vars_fast.attacks.base import TargetedAttack
from vars_fast.registry import TARGETED


def insa_loss(rec, targets: Tensor, users: Tensor):
    """``x [T,3,S,S] -> mean_u y_(u, targets[t]) [T]`` over ``users`` [U'] (all users, or a sample).

    The score is linear in the users, so a seeded user sample of a few hundred is an
    unbiased, cheap estimate when the user set is large (``attack.insa_users``).
    """
    def loss_fn(x: Tensor) -> Tensor:
        f = rec.encode(x)  # [T, F]
        T, U = f.shape[0], users.numel()
        items = targets.view(1, T).expand(U, T)
        vis = f.unsqueeze(0).expand(U, T, f.shape[1])
        return rec.score(users, items, visual=vis).float().mean(0)

    return loss_fn


def expa_loss(rec, hook_feature: Tensor):
    """``x [T,3,S,S] -> -||rec.encode(x) - hook_feature||^2 [T]`` (hook_feature: [F] or [T, F])."""
    def loss_fn(x: Tensor) -> Tensor:
        f = rec.encode(x).float()
        return -(f - hook_feature.to(f)).pow(2).sum(1)

    return loss_fn


TARGETED.register("aip-insa", TargetedAttack(lambda b: insa_loss(b.rec, b.targets, b.users), optimiser="pgd"))
TARGETED.register("aip-expa", TargetedAttack(lambda b: expa_loss(b.rec, b.hook_feature), optimiser="pgd"))
