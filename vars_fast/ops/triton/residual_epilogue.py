"""Triton kernels for residual_epilogue (forward and backward), as ``torch.library.triton_op``.

Registers ``vars_fast::residual_epilogue_triton`` (same schema as the extension's
``vars_fast::residual_epilogue``) and ``vars_fast::residual_epilogue_triton_backward``; the
autograd formula and fake kernels are shared with the extension op
(``vars_fast.ops.residual_epilogue.register_autograd``).

Layout: NCHW-contiguous or channels_last; element (n, c, i) sits at n*sN + c*sC + i*sHW, so
one pair of kernels serves both. Per (n, c) statistics are reduced by one program each
(strided loads: coalesced in NCHW, gathered in NHWC); the elementwise kernels run in memory
order. The tiny per-(n, c) coefficient algebra (O(N*C)) is done with torch ops in between.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from vars_fast.ops.residual_epilogue import (check_backward_inputs, check_kernel_inputs, fake_backward, fake_forward,
                                             out_like, register_autograd)

_BLOCK = 1024


@triton.jit
def _nc_sums_kernel(x_ptr, z_ptr, a_ptr, b_ptr, m_ptr, s1_ptr, s2_ptr, C, HW, sN, sC, sHW,
                    HAS_Z: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    """Program nc: forward (HAS_Z=False): s1 = sum(x - x0), s2 = sum((x - x0)^2) with x0 = the
    first element (a shift against cancellation); backward (HAS_Z, z = grad): g' = z masked by
    the ReLU of a*x + b, s1 = sum g', s2 = sum g' * (x - mean)."""
    nc = tl.program_id(0)
    n = nc // C
    c = nc % C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_Z:
        a = tl.load(a_ptr + nc)
        b = tl.load(b_ptr + nc)
        shift = tl.load(m_ptr + nc)
    else:
        shift = tl.load(x_ptr + base).to(tl.float32)
    for i0 in range(0, HW, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        msk = i < HW
        off = base + i.to(tl.int64) * sHW
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
        d = tl.where(msk, x - shift, 0.0)
        if HAS_Z:
            g = tl.load(z_ptr + off, mask=msk, other=0.0).to(tl.float32)
            if RELU:
                g = tl.where(a * x + b > 0, g, 0.0)
            acc1 += g
            acc2 += g * d
        else:
            acc1 += d
            acc2 += d * d
    tl.store(s1_ptr + nc, tl.sum(acc1, axis=0))
    tl.store(s2_ptr + nc, tl.sum(acc2, axis=0))
    if not HAS_Z:
        tl.store(m_ptr + nc, shift)


@triton.jit
def _apply_kernel(x_ptr, z_ptr, out_ptr, a_ptr, b_ptr, k1_ptr, k2_ptr, k3_ptr, numel, C, HW,
                  CL: tl.constexpr, HAS_Z: tl.constexpr, RELU: tl.constexpr, BACKWARD: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Elementwise, memory order. Forward: out = act(a*x + b) (+ z = residual). Backward:
    out = k1*g' + k2*x + k3 with g' = z (= grad) masked by the ReLU of a*x + b."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < numel
    if CL:
        nc = (offs // (HW * C)) * C + offs % C
    else:
        nc = offs // HW
    x = tl.load(x_ptr + offs, mask=msk, other=0.0)
    xf = x.to(tl.float32)
    a = tl.load(a_ptr + nc, mask=msk, other=0.0)
    b = tl.load(b_ptr + nc, mask=msk, other=0.0)
    h = a * xf + b
    if BACKWARD:
        g = tl.load(z_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        if RELU:
            g = tl.where(h > 0, g, 0.0)
        k1 = tl.load(k1_ptr + nc, mask=msk, other=0.0)
        k2 = tl.load(k2_ptr + nc, mask=msk, other=0.0)
        k3 = tl.load(k3_ptr + nc, mask=msk, other=0.0)
        tl.store(out_ptr + offs, (k1 * g + k2 * xf + k3).to(x.dtype), mask=msk)
    else:
        if RELU:
            h = tl.maximum(h, 0.0)
        o = h.to(x.dtype)
        if HAS_Z:
            o = o + tl.load(z_ptr + offs, mask=msk, other=0.0)
        tl.store(out_ptr + offs, o, mask=msk)


def _layout(y: Tensor):
    """(y in a kernel layout, channels_last?, N, C, HW, strides (sN, sC, sHW))."""
    cl = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    if not cl:
        y = y.contiguous()
    N, C = y.shape[0], y.shape[1]
    HW = y.numel() // max(N * C, 1)
    strides = (HW * C, 1, C) if cl else (C * HW, HW, 1)
    return y, cl, N, C, HW, strides


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], C: int, like: Tensor):
    w = weight.float() if weight is not None else torch.ones(C, device=like.device)
    b = bias.float() if bias is not None else torch.zeros(C, device=like.device)
    return w, b


def _per_nc(t: Tensor, N: int, C: int, batch: bool) -> Tensor:
    return (t.view(1, C).expand(N, C) if batch else t.view(N, C)).contiguous().view(-1)


@triton_op("vars_fast::residual_epilogue_triton", mutates_args=())
def residual_epilogue_triton(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                             running_mean: Optional[Tensor], running_var: Optional[Tensor], norm: str, relu: bool,
                             use_input_stats: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    check_kernel_inputs("residual_epilogue_triton", y, weight, bias, residual, running_mean, running_var, norm,
                        use_input_stats)
    batch = norm == "batch"
    y, cl, N, C, HW, (sN, sC, sHW) = _layout(y)
    out = out_like(y)
    if use_input_stats:
        s1 = torch.empty(N * C, device=y.device, dtype=torch.float32)
        s2, shift = torch.empty_like(s1), torch.empty_like(s1)
        if y.numel():
            wrap_triton(_nc_sums_kernel)[(N * C,)](y, y, s1, s1, shift, s1, s2, C, HW, sN, sC, sHW,
                                                   HAS_Z=False, RELU=False, BLOCK=_BLOCK)
        s1, s2, shift = s1.view(N, C).double(), s2.view(N, C).double(), shift.view(N, C).double()
        if batch:  # fold per-(n, c) shifted moments to per-c: sum over n of (x - shift_n)
            cnt = N * HW
            ref = shift[0]
            d = shift - ref  # (x - ref) = (x - shift_n) + d_n
            t1 = (s1 + HW * d).sum(0)
            t2 = (s2 + 2 * d * s1 + HW * d * d).sum(0)
            mean_s = t1 / cnt
            mean, var = ref + mean_s, t2 / cnt - mean_s ** 2
        else:
            mean_s = s1 / HW
            mean, var = shift + mean_s, s2 / HW - mean_s ** 2
        mean = mean.float()
        rstd = (var.clamp_min(0) + eps).rsqrt().float()
    else:
        mean = running_mean.to(torch.float32, copy=True)  # outputs must not alias inputs
        rstd = (running_var.double() + eps).rsqrt().float()
    w, b = _affine(weight, bias, C, y)
    wk = w if batch else w.view(1, C)
    a = _per_nc(wk * rstd, N, C, batch)
    bb = _per_nc((b if batch else b.view(1, C)) - mean * wk * rstd, N, C, batch)
    r = None
    if residual is not None:
        r = residual.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    if y.numel():
        grid = (triton.cdiv(y.numel(), _BLOCK),)
        wrap_triton(_apply_kernel)[grid](y, r if r is not None else y, out, a, bb, a, a, a, y.numel(), C, HW,
                                         CL=cl, HAS_Z=r is not None, RELU=relu, BACKWARD=False, BLOCK=_BLOCK)
    # Statistics in the extension op's dtype (fp64 for fp64 y), so one fake kernel serves both.
    sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    return out, mean.to(sdt), rstd.to(sdt)


@triton_op("vars_fast::residual_epilogue_triton_backward", mutates_args=())
def residual_epilogue_triton_backward(grad_out: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                      mean: Tensor, rstd: Tensor, norm: str, relu: bool,
                                      use_input_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_backward_inputs("residual_epilogue_triton_backward", grad_out, y, weight, bias, mean, rstd, norm)
    batch = norm == "batch"
    y, cl, N, C, HW, (sN, sC, sHW) = _layout(y)
    g = grad_out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    w, b = _affine(weight, bias, C, y)
    mean, rstd = mean.float(), rstd.float()
    wk = w if batch else w.view(1, C)
    a = _per_nc(wk * rstd, N, C, batch)
    bb = _per_nc((b if batch else b.view(1, C)) - mean * wk * rstd, N, C, batch)
    m_nc = _per_nc(mean, N, C, batch)
    s1 = torch.zeros(N * C, device=y.device, dtype=torch.float32)
    s2 = torch.zeros_like(s1)
    if y.numel():
        wrap_triton(_nc_sums_kernel)[(N * C,)](y, g, a, bb, m_nc, s1, s2, C, HW, sN, sC, sHW,
                                               HAS_Z=True, RELU=relu, BLOCK=_BLOCK)
    s1, s2 = s1.view(N, C).double(), s2.view(N, C).double()
    t1, t2 = (s1.sum(0), s2.sum(0)) if batch else (s1, s2)
    r64, m64 = rstd.double(), mean.double()
    dw = (t2 * r64).sum(0) if not batch else t2 * r64
    db = t1.sum(0) if not batch else t1
    cnt = N * HW if batch else HW
    wr = (w.double() if batch else w.double().view(1, C)) * r64
    if use_input_stats:
        c1, c2 = t1 / cnt, t2 * r64 * r64 / cnt
    else:
        c1, c2 = torch.zeros_like(wr), torch.zeros_like(wr)
    k1 = _per_nc(wr.float(), N, C, batch)
    k2 = _per_nc((-wr * c2).float(), N, C, batch)
    k3 = _per_nc((wr * (m64 * c2 - c1)).float(), N, C, batch)
    dy = out_like(y)
    if y.numel():
        grid = (triton.cdiv(y.numel(), _BLOCK),)
        wrap_triton(_apply_kernel)[grid](y, g, dy, a, bb, k1, k2, k3, y.numel(), C, HW,
                                         CL=cl, HAS_Z=True, RELU=relu, BACKWARD=True, BLOCK=_BLOCK)
    sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    return dy, dw.to(sdt), db.to(sdt)


register_autograd("vars_fast::residual_epilogue_triton", residual_epilogue_triton_backward)

# The extension ops' fake kernels (the default one of a triton_op runs its body, which under
# TRITON_INTERPRET=1 would launch the interpreted kernel on fake tensors).
residual_epilogue_triton.register_fake(fake_forward)
residual_epilogue_triton_backward.register_fake(fake_backward)
