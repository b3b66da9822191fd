"""PGD in the L2 ball (Madry et al., 2018; the L2 form of Rony et al., 2019, "Decoupling
Direction and Norm").

``x^{t+1} = clip_[0,1](P_{x,eps}(x^t + alpha * g / ||g||_2))`` for T steps, with
``g = grad_x L(x^t)`` per image and ``P_{x,eps}`` the projection of ``x^t - x`` onto the L2
ball of radius ``eps`` (a rescale when the norm exceeds eps). Unlike the L-inf attacks the
budget can go anywhere in the image: a few pixels may move far while most stay put, which
is a perturbation shape the detector never trains on.

``eps`` is the L2 radius in [0,1] pixel units over the whole [3,S,S] image (``l2_radius``
converts a per-pixel RMS budget in /255 units, the scale of the L-inf eps). The [0,1] clamp
after the projection can only shorten ``x^t - x``, so ``||x_adv - x||_2 <= eps`` holds.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vars_fast.attacks.base import Attack, LossFn, as_eps
from vars_fast.attacks.pgd import default_alpha
from vars_fast.registry import ATTACKS


def l2_radius(rms255: float, shape) -> float:
    """L2 radius of a perturbation whose per-pixel RMS is ``rms255``/255 on an image of ``shape``
    ([3,S,S]): an L-inf sign perturbation of eps has RMS eps, so ``rms255 = eps`` puts the L2
    ball's radius at the norm of the L-inf ball's corners."""
    return float(rms255) / 255.0 * math.sqrt(math.prod(int(s) for s in shape))


def _norms(v: Tensor) -> Tensor:
    """Per-sample L2 norms of v [B,...] as [B,1,...,1] (floored to avoid 0/0)."""
    return v.flatten(1).float().norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1))).to(v.dtype)


def project_l2(x_adv: Tensor, x0: Tensor, eps: float | Tensor) -> Tensor:
    """x0 + (x_adv - x0) scaled into the L2 ball of radius eps, then clamped to [0,1]."""
    d = x_adv - x0
    d = d * torch.clamp(as_eps(eps, d) / _norms(d), max=1.0)
    return (x0 + d).clamp_(0.0, 1.0)


@ATTACKS.register("pgd-l2", iterative=True, ball="l2")
class PGDL2(Attack):
    """``PGDL2(loss_fn, eps, alpha=None, steps=10, random_start=False, generator=None)(x)``.

    eps, alpha: L2 lengths in [0,1] pixel units, floats or [B] tensors (alpha None:
    ``2.5 * eps / steps``, as the L-inf PGD). ``random_start``: start at a point drawn
    uniformly in the ball (a Gaussian direction, radius ``eps * U^(1/n)``) from ``generator``.
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, alpha: float | Tensor | None = None,
                 steps: int = 10, random_start: bool = False, generator: torch.Generator | None = None):
        super().__init__(loss_fn, eps, generator)
        if steps < 1:
            raise ValueError(f"PGD-L2 steps must be >= 1 (got {steps})")
        self.steps = int(steps)
        self.alpha = default_alpha(eps, steps) if alpha is None else alpha
        self.random_start = bool(random_start)

    @classmethod
    def craft(cls, loss_fn, x, eps, *, steps=10, alpha=None, init=None, random_start=False, generator=None,
              keep_best=False):
        if init is not None or keep_best:
            raise ValueError("PGD-L2 takes no init and keeps the last iterate")
        return cls(loss_fn, eps, alpha=alpha, steps=steps, random_start=random_start, generator=generator)(x)

    def start(self, x: Tensor) -> Tensor:
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        kw = dict(generator=self.generator, device=gen_device, dtype=torch.float32)
        d = torch.randn(x.shape, **kw)
        r = torch.rand((x.shape[0],), **kw).pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
        d = (d / _norms(d) * r).to(x.device, x.dtype)
        return project_l2(x + d * as_eps(self.eps, x), x, self.eps)

    def perturb(self, x: Tensor) -> Tensor:
        x0 = x.detach()
        x_adv = self.start(x0) if self.random_start else x0.clone()
        for _ in range(self.steps):
            _, grad = self.loss_and_grad(x_adv)
            x_adv = project_l2(x_adv + as_eps(self.alpha, x_adv) * grad / _norms(grad), x0, self.eps)
        return x_adv
