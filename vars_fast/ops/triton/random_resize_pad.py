"""Triton random_resize_pad: one program per (plane, block of output pixels), direct bilinear /
nearest gather with F.interpolate's index rules; backward scatters with fp32 (fp64 for fp64)
atomics into a zeroed buffer, then casts.

Registered as ``vars_fast::random_resize_pad_triton`` (+ ``_backward``) through
``torch.library.triton_op``; input checks and autograd (double backward included) are the
extension op's, from ``vars_fast.ops.random_resize_pad``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from vars_fast.ops.random_resize_pad import check_draws, fake_backward, fake_forward, register_autograd

_BLOCK = 512


@triton.jit
def _src_linear(dst, in_size, s):
    # ATen area_pixel_compute_source_index (align_corners=False) + guard_index_and_lambda.
    scale = in_size.to(tl.float32) / s.to(tl.float32)
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _src_nearest(dst, in_size, s):
    scale = in_size.to(tl.float32) / s.to(tl.float32)
    return tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int32), in_size - 1)


@triton.jit
def _window(sizes_ptr, offsets_ptr, plane, C, O, pix):
    b = plane // C
    s = tl.load(sizes_ptr + b).to(tl.int32)
    top = tl.load(offsets_ptr + 2 * b).to(tl.int32)
    left = tl.load(offsets_ptr + 2 * b + 1).to(tl.int32)
    r = pix // O - top
    j = pix % O - left
    inside = (r >= 0) & (r < s) & (j >= 0) & (j < s) & (pix < O * O)
    return s, tl.where(inside, r, 0), tl.where(inside, j, 0), inside


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, sizes_ptr, offsets_ptr, C, H, W, O, BILINEAR: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(1)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s, r, j, inside = _window(sizes_ptr, offsets_ptr, plane, C, O, pix)
    src = x_ptr + plane.to(tl.int64) * H * W
    if BILINEAR:
        y0, y1, ly = _src_linear(r, H, s)
        x0, x1, lx = _src_linear(j, W, s)
        v00 = tl.load(src + y0 * W + x0, mask=inside, other=0.0).to(tl.float32)
        v01 = tl.load(src + y0 * W + x1, mask=inside, other=0.0).to(tl.float32)
        v10 = tl.load(src + y1 * W + x0, mask=inside, other=0.0).to(tl.float32)
        v11 = tl.load(src + y1 * W + x1, mask=inside, other=0.0).to(tl.float32)
        top_row = (1.0 - lx) * v00 + lx * v01
        bot_row = (1.0 - lx) * v10 + lx * v11
        v = (1.0 - ly) * top_row + ly * bot_row
    else:
        iy = _src_nearest(r, H, s)
        ix = _src_nearest(j, W, s)
        v = tl.load(src + iy * W + ix, mask=inside, other=0.0).to(tl.float32)
    v = tl.where(inside, v, 0.0)
    tl.store(out_ptr + plane.to(tl.int64) * O * O + pix, v.to(out_ptr.dtype.element_ty), mask=pix < O * O)


@triton.jit
def _bwd_kernel(g_ptr, acc_ptr, sizes_ptr, offsets_ptr, C, H, W, O, BILINEAR: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(1)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s, r, j, inside = _window(sizes_ptr, offsets_ptr, plane, C, O, pix)
    g = tl.load(g_ptr + plane.to(tl.int64) * O * O + pix, mask=inside, other=0.0).to(acc_ptr.dtype.element_ty)
    dst = acc_ptr + plane.to(tl.int64) * H * W
    if BILINEAR:
        y0, y1, ly = _src_linear(r, H, s)
        x0, x1, lx = _src_linear(j, W, s)
        tl.atomic_add(dst + y0 * W + x0, g * (1.0 - ly) * (1.0 - lx), mask=inside)
        tl.atomic_add(dst + y0 * W + x1, g * (1.0 - ly) * lx, mask=inside)
        tl.atomic_add(dst + y1 * W + x0, g * ly * (1.0 - lx), mask=inside)
        tl.atomic_add(dst + y1 * W + x1, g * ly * lx, mask=inside)
    else:
        iy = _src_nearest(r, H, s)
        ix = _src_nearest(j, W, s)
        tl.atomic_add(dst + iy * W + ix, g, mask=inside)


@triton_op("vars_fast::random_resize_pad_triton", mutates_args=())
def random_resize_pad_triton(x: Tensor, sizes: Tensor, offsets: Tensor, out_size: int, mode: str) -> Tensor:
    check_draws("random_resize_pad_triton", x, sizes, offsets, mode)
    torch._check(out_size >= 1, lambda: f"vars_fast::random_resize_pad_triton: out_size must be >= 1, got {out_size}")
    x, sizes, offsets = x.contiguous(), sizes.contiguous(), offsets.contiguous()
    B, C, H, W = x.shape
    out = torch.empty(B, C, out_size, out_size, dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (triton.cdiv(out_size * out_size, _BLOCK), B * C)
        wrap_triton(_fwd_kernel)[grid](x, out, sizes, offsets, C, H, W, out_size,
                                       BILINEAR=mode == "bilinear", BLOCK=_BLOCK)
    return out


@triton_op("vars_fast::random_resize_pad_triton_backward", mutates_args=())
def random_resize_pad_triton_backward(grad_out: Tensor, sizes: Tensor, offsets: Tensor, in_h: int, in_w: int,
                                      mode: str) -> Tensor:
    check_draws("random_resize_pad_triton_backward", grad_out, sizes, offsets, mode, backward=True)
    grad_out, sizes, offsets = grad_out.contiguous(), sizes.contiguous(), offsets.contiguous()
    B, C, O, _ = grad_out.shape
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    acc = torch.zeros(B, C, in_h, in_w, dtype=acc_dtype, device=grad_out.device)
    if grad_out.numel():
        grid = (triton.cdiv(O * O, _BLOCK), B * C)
        wrap_triton(_bwd_kernel)[grid](grad_out, acc, sizes, offsets, C, in_h, in_w, O,
                                       BILINEAR=mode == "bilinear", BLOCK=_BLOCK)
    return acc.to(grad_out.dtype)


register_autograd("vars_fast::random_resize_pad_triton", random_resize_pad_triton,
                  "vars_fast::random_resize_pad_triton_backward", random_resize_pad_triton_backward)
# The extension ops' fake kernels (the default one of a triton_op runs its body, which under
# TRITON_INTERPRET=1 would launch the interpreted kernel on fake tensors).
random_resize_pad_triton.register_fake(fake_forward)
random_resize_pad_triton_backward.register_fake(fake_backward)
