"""pgd_step: sign step, projection onto the L-inf ball around x_orig, clamp to [0, 1].

SKELETON: reference only; the kernel work (issue 5) adds registration and backends.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _as_batch(v: float | Tensor, x: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t


def pgd_step_reference(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha: float | Tensor,
                       eps: float | Tensor) -> Tensor:
    """Out of place. x_adv, x_orig, grad: [B, ...]; alpha, eps: scalars or [B] (pixel units in [0,1])."""
    a, e = _as_batch(alpha, x_adv), _as_batch(eps, x_adv)
    xf, x0 = x_adv.float(), x_orig.float()
    y = xf + a * torch.sign(grad.float())
    y = torch.minimum(torch.maximum(y, x0 - e), x0 + e).clamp_(0.0, 1.0)
    return y.to(x_adv.dtype)


def pgd_step(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha: float | Tensor, eps: float | Tensor,
             inplace: bool = False, backend: str | None = None) -> Tensor:
    """x' = clip_[0,1](clip_{x_orig, eps}(x_adv + alpha * sign(grad))).

    Shapes: x_adv, x_orig, grad [B, C, H, W] (any shape with a leading batch dim);
    alpha, eps: python floats, 0-d tensors or [B] tensors (per-sample). Returns x' (x_adv
    itself when ``inplace``).
    """
    y = pgd_step_reference(x_adv, x_orig, grad, alpha, eps)
    if inplace:
        with torch.no_grad():
            x_adv.copy_(y)
        return x_adv
    return y
