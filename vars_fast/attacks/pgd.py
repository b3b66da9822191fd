"""PGD, L-inf (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks"; Kurakin et al., 2017 without the random start).

``x^{t+1} = clip_[0,1](clip_{x,eps}(x^t + alpha * sign(grad_x L(x^t))))`` for T steps, from
``x^0 = x`` or a uniform random start in the eps-ball. The update is the fused
``vars_fast.ops.pgd_step`` applied in place. Defaults: ``steps=10``,
``alpha = 2.5 * eps / steps`` (Madry et al.), random start on.
With ``steps=1, alpha=eps, random_start=False`` PGD is exactly FGSM. ``keep_best=True``
returns each sample's best iterate by its loss (one extra forward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vars_fast.attacks.base import Attack, LossFn, as_eps
from vars_fast.ops import pgd_step
from vars_fast.registry import ATTACKS


def default_alpha(eps: float | Tensor, steps: int) -> float | Tensor:
    """Madry et al.'s step: 2.5 * eps / steps (reaches the ball's surface from anywhere inside)."""
    return 2.5 * eps / steps


@ATTACKS.register("pgd", iterative=True, ball="linf")
class PGD(Attack):
    """``PGD(loss_fn, eps, alpha=None, steps=10, random_start=True, generator=None, keep_best=False,
    eot=1)(x)``.

    eps, alpha: pixel units, floats or [B] tensors (alpha None: ``default_alpha``).
    ``__call__(x, init=None)``: ``init`` [B,3,S,S] overrides the random start with a given
    starting point (projected into the ball); the catalogue attack uses it to draw each
    item's start from its own seed so that the batch size cannot change the result.
    ``eot``: draws of a stochastic ``loss_fn`` averaged per step (``Attack``).
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, alpha: float | Tensor | None = None,
                 steps: int = 10, random_start: bool = True, generator: torch.Generator | None = None,
                 keep_best: bool = False, eot: int = 1):
        super().__init__(loss_fn, eps, generator, eot=eot)
        if steps < 1:
            raise ValueError(f"PGD steps must be >= 1 (got {steps})")
        self.steps = int(steps)
        self.alpha = default_alpha(eps, steps) if alpha is None else alpha
        self.random_start = bool(random_start)
        self.keep_best = bool(keep_best)

    @classmethod
    def craft(cls, loss_fn, x, eps, *, steps=10, alpha=None, init=None, random_start=False, generator=None,
              keep_best=False, eot=1):
        return cls(loss_fn, eps, alpha=alpha, steps=steps, random_start=random_start, generator=generator,
                   keep_best=keep_best, eot=eot)(x, init=init)

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
        if not self.keep_best:
            for _ in range(self.steps):
                _, grad = self.loss_and_grad(x_adv)
                pgd_step(x_adv, x0, grad, self.alpha, self.eps, inplace=True)
            return x_adv
        # keep_best: return each sample's best iterate (start included), not the last one. Sign
        # steps of a fixed size overshoot on a rugged loss (small images, saturating
        # activations), so the last iterate can be worse than an earlier one; the best one
        # never loses to the start, which is what makes a warm-started larger eps at least as
        # strong as the smaller eps it started from (targeted.py). One extra forward at the end.
        best, best_loss = x_adv.clone(), None
        for _ in range(self.steps):
            loss, grad = self.loss_and_grad(x_adv)
            best_loss = self._keep(best, best_loss, x_adv, loss)
            pgd_step(x_adv, x0, grad, self.alpha, self.eps, inplace=True)
        with torch.no_grad():
            self._keep(best, best_loss, x_adv, self.eval_loss(x_adv))
        return best

    @staticmethod
    def _keep(best: Tensor, best_loss: Tensor | None, x: Tensor, loss: Tensor) -> Tensor:
        loss = loss.float()
        if best_loss is None:
            best.copy_(x)
            return loss.clone()
        better = loss > best_loss
        best[better] = x[better]
        return torch.where(better, loss, best_loss)
