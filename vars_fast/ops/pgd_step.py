"""pgd_step: sign step, projection onto the L-inf ball around x_orig, clamp to [0, 1].

Backends (chosen in ``_dispatch``): Triton (``vars_fast::pgd_step_triton[_]``, CUDA tensors),
the compiled extension (``vars_fast::pgd_step[_]``, CPU and CUDA kernels) and the pure-torch
reference below, which is the spec. Every backend does its math in fp32 and rounds once on
store, so fp32 results are bit-identical across backends and fp16/bf16 agree to one ulp.

The op is an optimiser-style update, not a differentiable function: no autograd is registered
and the result never requires grad. The in-place schema marks ``x_adv`` as mutated
(``Tensor(a!)``) so that torch.compile functionalises it without a graph break.

The PGD random start (x_orig + U(-eps, eps), clamped) is deliberately not fused: it runs once
per attack against 10+ steps, so ``pgd_random_start`` below is plain torch (one extra pass).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vars_fast import _ext
from vars_fast.ops import _checks, _dispatch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def pgd_random_start(x_orig: Tensor, eps: float | Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """PGD's random start: clamp01(x_orig + U(-eps, eps)), eps a scalar or per-sample [B]."""
    u = torch.empty(x_orig.shape, dtype=torch.float32, device=x_orig.device).uniform_(-1.0, 1.0, generator=generator)
    return (x_orig.float() + u * _as_batch(eps, x_orig)).clamp_(0.0, 1.0).to(x_orig.dtype)


def _kernel_args(v: float | Tensor, x: Tensor) -> tuple[Optional[Tensor], float]:
    """(per-sample fp32 [B] tensor or None, python float) as the kernels' schema wants them.

    A 0-d tensor is expanded to [B] rather than read with float(): that would sync the GPU and
    break a torch.compile graph."""
    if isinstance(v, Tensor):
        t = v.to(device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"pgd_step: alpha/eps tensor must be 0-d or [B={x.shape[0]}], got {tuple(v.shape)}")
        return t.contiguous(), 0.0
    return None, float(v)


def _kernel_refusal(x_adv: Tensor, x_orig: Tensor, grad: Tensor, inplace: bool) -> Optional[str]:
    if x_orig.shape != x_adv.shape or grad.shape != x_adv.shape:
        return f"shapes differ (x_adv {tuple(x_adv.shape)}, x_orig {tuple(x_orig.shape)}, grad {tuple(grad.shape)})"
    if x_orig.dtype != x_adv.dtype or grad.dtype != x_adv.dtype:
        return f"dtypes differ ({x_adv.dtype}, {x_orig.dtype}, {grad.dtype})"
    if x_adv.dtype not in _DTYPES:
        return f"dtype {x_adv.dtype} is not supported"
    if x_adv.dim() == 0:
        return "inputs need a leading batch dimension"
    if inplace and not x_adv.is_contiguous():
        return "in-place update needs a contiguous x_adv"
    return None


def check_kernel_inputs(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha_t: Optional[Tensor],
                        eps_t: Optional[Tensor]) -> None:
    """The kernels' schema conditions (csrc/common.h ``check_pgd_step_inputs``) as torch._check,
    for the fake kernels and the Triton ops."""
    op = "pgd_step"
    _checks.ndim(op, "x_adv", x_adv, 1, "[B, ...] (a leading batch dimension)", at_least=True)
    _checks.same_shape(op, ("x_adv", "x_orig", "grad"), (x_adv, x_orig, grad))
    _checks.same_dtype(op, ("x_adv", "x_orig", "grad"), (x_adv, x_orig, grad))
    _checks.floating(op, "x_adv", x_adv)
    _checks.same_device(op, x_adv, x_orig, grad, alpha_t, eps_t)
    for name, t in (("alpha_t", alpha_t), ("eps_t", eps_t)):
        if t is not None:
            _checks.vector(op, name, t, x_adv.shape[0], dtype=torch.float32)


# Fake kernels, shared by the extension ops and the Triton ops.
def fake_pgd_step(x_adv, x_orig, grad, alpha_t, eps_t, alpha, eps):
    check_kernel_inputs(x_adv, x_orig, grad, alpha_t, eps_t)
    return torch.empty_like(x_adv, memory_format=torch.contiguous_format)


def fake_pgd_step_(x_adv, x_orig, grad, alpha_t, eps_t, alpha, eps):
    check_kernel_inputs(x_adv, x_orig, grad, alpha_t, eps_t)
    torch._check(x_adv.is_contiguous(), lambda: "vars_fast::pgd_step_: in-place update needs a contiguous x_adv")
    return None


if _ext.has_ops() and hasattr(torch.ops.vars_fast, "pgd_step"):
    torch.library.register_fake("vars_fast::pgd_step")(fake_pgd_step)
    torch.library.register_fake("vars_fast::pgd_step_")(fake_pgd_step_)


def pgd_step(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha: float | Tensor, eps: float | Tensor,
             inplace: bool = False, backend: str | None = None) -> Tensor:
    """x' = clip_[0,1](clip_{x_orig, eps}(x_adv + alpha * sign(grad))).

    Shapes: x_adv, x_orig, grad [B, C, H, W] (any shape with a leading batch dim);
    alpha, eps: python floats, 0-d tensors or [B] tensors (per-sample). Returns x' (x_adv
    itself when ``inplace``). dtypes fp32/fp16/bf16 (fp64 accepted; math is fp32 throughout).
    ``backend``: None (auto), "triton", "ext"/"cpp"/"cuda", "reference" (see ``_dispatch``).
    """
    why = _kernel_refusal(x_adv, x_orig, grad, inplace)
    b = _dispatch.choose("pgd_step", (x_adv, x_orig, grad), backend, triton_ok=why, ext_ok=why)
    with torch.no_grad():
        if b == "reference":
            y = pgd_step_reference(x_adv, x_orig, grad, alpha, eps)
            if inplace:
                x_adv.copy_(y)
                return x_adv
            return y
        at, af = _kernel_args(alpha, x_adv)
        et, ef = _kernel_args(eps, x_adv)
        if b == "triton":
            # choose() imported vars_fast.ops.triton.pgd_step, which registered these ops.
            fn, fn_ = torch.ops.vars_fast.pgd_step_triton, torch.ops.vars_fast.pgd_step_triton_
        else:
            fn, fn_ = torch.ops.vars_fast.pgd_step, torch.ops.vars_fast.pgd_step_
        if inplace:
            fn_(x_adv, x_orig, grad, at, et, af, ef)
            return x_adv
        return fn(x_adv, x_orig, grad, at, et, af, ef)
