"""Triton pgd_step: one flat pass, fp32 math, per-sample alpha/eps looked up by sample index.

Registered as ``vars_fast::pgd_step_triton`` (out of place) and ``vars_fast::pgd_step_triton_``
(mutates x_adv) via ``torch.library.triton_op``; same argument list as the C++ schema.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from vars_fast.ops.pgd_step import check_kernel_inputs, fake_pgd_step, fake_pgd_step_

_BLOCK = 2048


@triton.jit
def _pgd_step_kernel(out_ptr, xa_ptr, x0_ptr, g_ptr, a_ptr, e_ptr, alpha, eps, n, per,
                     PER_SAMPLE_A: tl.constexpr, PER_SAMPLE_E: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: B x 3 x 224 x 224 batches can pass 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_SAMPLE_A:
        a = tl.load(a_ptr + offs // per, mask=mask, other=0.0)
    else:
        a = alpha
    if PER_SAMPLE_E:
        e = tl.load(e_ptr + offs // per, mask=mask, other=0.0)
    else:
        e = eps
    s = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
    y = x + a * s
    y = tl.minimum(tl.maximum(y, x0 - e), x0 + e)
    y = tl.minimum(tl.maximum(y, 0.0), 1.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(out: Tensor, x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha_t: Optional[Tensor],
            eps_t: Optional[Tensor], alpha: float, eps: float) -> None:
    n = x_adv.numel()
    if n == 0:
        return
    per = n // x_adv.shape[0]
    # Unused pointer slots get x_adv (never read when the constexpr flag is off).
    a_ptr = alpha_t if alpha_t is not None else x_adv
    e_ptr = eps_t if eps_t is not None else x_adv
    grid = (triton.cdiv(n, _BLOCK),)
    wrap_triton(_pgd_step_kernel)[grid](out, x_adv, x_orig, grad, a_ptr, e_ptr, alpha, eps, n, per,
                                        PER_SAMPLE_A=alpha_t is not None, PER_SAMPLE_E=eps_t is not None,
                                        BLOCK=_BLOCK)


@triton_op("vars_fast::pgd_step_triton", mutates_args=())
def pgd_step_triton(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha_t: Optional[Tensor],
                    eps_t: Optional[Tensor], alpha: float, eps: float) -> Tensor:
    check_kernel_inputs(x_adv, x_orig, grad, alpha_t, eps_t)
    x_adv, x_orig, grad = x_adv.contiguous(), x_orig.contiguous(), grad.contiguous()
    out = torch.empty_like(x_adv)
    _launch(out, x_adv, x_orig, grad, alpha_t, eps_t, alpha, eps)
    return out


@triton_op("vars_fast::pgd_step_triton_", mutates_args={"x_adv"})
def pgd_step_triton_(x_adv: Tensor, x_orig: Tensor, grad: Tensor, alpha_t: Optional[Tensor],
                     eps_t: Optional[Tensor], alpha: float, eps: float) -> None:
    check_kernel_inputs(x_adv, x_orig, grad, alpha_t, eps_t)
    torch._check(x_adv.is_contiguous(), lambda: "vars_fast::pgd_step_triton_: in-place update needs a contiguous x_adv")
    # Each element is read before it is written by the same program, so out may alias x_adv.
    _launch(x_adv, x_adv, x_orig.contiguous(), grad.contiguous(), alpha_t, eps_t, alpha, eps)


# The extension ops' fake kernels (the default one of a triton_op runs its body, which under
# TRITON_INTERPRET=1 would launch the interpreted kernel on fake tensors).
pgd_step_triton.register_fake(fake_pgd_step)
pgd_step_triton_.register_fake(fake_pgd_step_)
