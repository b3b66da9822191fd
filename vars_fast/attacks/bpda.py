"""BPDA: straight-through gradients for the steps of a pipeline that have none (Athalye, Carlini
& Wagner, 2018, "Obfuscated Gradients Give a False Sense of Security", Sec. 4.1).

A deployed pipeline rounds uploads to uint8 and clamps the denoiser's output to [0,1]. Rounding
has a zero gradient almost everywhere and a clamp has none outside its range, so an attacker
who differentiates the real pipeline gets no signal from those steps and concludes the defence
holds. BPDA runs the real step forward and replaces its backward pass by that of a
differentiable approximation: here the identity, since both steps are close to it.

An attacker composes these into its loss, e.g. ``rec_loss(clamp(denoiser(quantize_u8(x))))``.
The forward values are exactly the real op's (a custom autograd function, not the
``x + (f(x) - x).detach()`` trick, which can be off by one ulp).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


class _Bpda(torch.autograd.Function):
    """forward ``fn(x)``; backward the vector-Jacobian product of ``approx`` at x (None: identity)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], approx: Optional[Callable[[Tensor], Tensor]]):
        ctx.approx = approx
        if approx is not None:
            ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.approx is None:
            return g, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.approx(xr), xr, g)
        return gx, None, None


def bpda(fn: Callable[[Tensor], Tensor], x: Tensor, approx: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``fn(x)`` forward; backward through ``approx`` (a differentiable stand-in for ``fn``,
    default the identity). ``fn`` must keep x's shape when ``approx`` is the identity."""
    return _Bpda.apply(x, fn, approx)


def straight_through(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` forward, identity backward."""
    return _Bpda.apply(x, fn, None)


def _round_u8(x: Tensor) -> Tensor:
    return torch.round(x * 255.0) / 255.0


def quantize_u8(x: Tensor) -> Tensor:
    """The uint8 round trip of an upload, ``round(x * 255) / 255`` (x in [0,1]); identity backward."""
    return _Bpda.apply(x, _round_u8, None)


def clamp(x: Tensor, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """``x.clamp(lo, hi)`` forward (e.g. the denoiser's output clamp); identity backward, so the
    gradient still flows where the clamp saturates."""
    return _Bpda.apply(x, lambda t: t.clamp(lo, hi), None)
