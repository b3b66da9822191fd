"""PGD, L-inf (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks"; Kurakin et al., 2017 without the random start).

``x^{t+1} = clip_[0,1](clip_{x,eps}(x^t + alpha * sign(grad_x L(x^t))))`` for T steps, from
``x^0 = x`` or a uniform random start in the eps-ball. The update is the fused
``vars_fast.ops.pgd_step`` applied in place. Defaults: ``steps=10``,
``alpha = 2.5 * eps / steps`` (Madry et al.), random start on.
With ``steps=1, alpha=eps, random_start=False`` PGD is exactly FGSM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vars_fast.attacks.base import Attack, LossFn, as_eps
from vars_fast.ops import pgd_step


def default_alpha(eps: float | Tensor, steps: int) -> float | Tensor:
    """Madry et al.'s step: 2.5 * eps / steps (reaches the ball's surface from anywhere inside)."""
    return 2.5 * eps / steps


class PGD(Attack):
    """``PGD(loss_fn, eps, alpha=None, steps=10, random_start=True, generator=None)(x)``.

    eps, alpha: pixel units, floats or [B] tensors (alpha None: ``default_alpha``).
    ``__call__(x, init=None)``: ``init`` [B,3,S,S] overrides the random start with a given
    starting point (projected into the ball); the catalogue attack uses it to draw each
    item's start from its own seed so that the batch size cannot change the result.
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, alpha: float | Tensor | None = None,
                 steps: int = 10, random_start: bool = True, generator: torch.Generator | None = None):
        super().__init__(loss_fn, eps, generator)
        if steps < 1:
            raise ValueError(f"PGD steps must be >= 1 (got {steps})")
        self.steps = int(steps)
        self.alpha = default_alpha(eps, steps) if alpha is None else alpha
        self.random_start = bool(random_start)

    def start(self, x: Tensor) -> Tensor:
        """Uniform start in the eps-ball (intersected with [0,1]), drawn from ``generator``."""
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        u = torch.rand(x.shape, generator=self.generator, device=gen_device, dtype=torch.float32).to(x.device)
        e = as_eps(self.eps, x)
        return (x + (2 * u - 1) * e).clamp_(0.0, 1.0).to(x.dtype)

    def perturb(self, x: Tensor, init: Tensor | None = None) -> Tensor:
        x0 = x.detach()
        if init is not None:
            e = as_eps(self.eps, x0)
            x_adv = torch.minimum(torch.maximum(init.to(x0), x0 - e), x0 + e).clamp_(0.0, 1.0)
        elif self.random_start:
            x_adv = self.start(x0)
        else:
            x_adv = x0.clone()
        for _ in range(self.steps):
            _, grad = self.loss_and_grad(x_adv)
            pgd_step(x_adv, x0, grad, self.alpha, self.eps, inplace=True)
        return x_adv
