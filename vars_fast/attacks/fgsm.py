"""FGSM (Goodfellow et al., 2015, "Explaining and Harnessing Adversarial Examples").

Eq. 4 of the paper: ``x_adv = clip_[0,1](x + eps * sign(grad_x L))`` with L the loss to
maximise (the BPR loss for the untargeted attack). One forward + one input-gradient
backward. Default radius in the paper's tables: eps = 8/255.
"""
from __future__ import annotations

from torch import Tensor

from vars_fast.attacks.base import Attack, as_eps
from vars_fast.registry import ATTACKS


@ATTACKS.register("fgsm", iterative=False, ball="linf")
class FGSM(Attack):
    """``FGSM(loss_fn, eps)(x) -> x_adv``; eps in pixel units (float or [B])."""

    @classmethod
    def craft(cls, loss_fn, x, eps, **_):
        """One signed-gradient step of size eps: steps, alpha and a start do not apply."""
        return cls(loss_fn, eps)(x)

    def perturb(self, x: Tensor) -> Tensor:
        _, grad = self.loss_and_grad(x)
        # plain ops on purpose: PGD(1 step, alpha=eps, no random start) goes through the
        # fused pgd_step, and the test that both agree checks one against the other
        return (x + as_eps(self.eps, x) * grad.sign()).clamp_(0.0, 1.0)
