"""Random resize + zero pad at a random offset, fixed output shape (Xie et al. 2018).

Backends (chosen in ``_dispatch``): Triton (``vars_fast::random_resize_pad_triton``, CUDA
tensors), the compiled extension (``vars_fast::random_resize_pad``, CPU and CUDA kernels) and
the per-sample reference loop below, which is the spec (F.interpolate, align_corners=False,
antialias=False for bilinear; legacy "nearest"). ``random_resize_pad_grid_sample`` is the
batched ``grid_sample`` formulation, kept as the second benchmark baseline.

Differentiable w.r.t. ``x`` on every backend, twice and more: ``register_autograd`` below
wires each backend's forward and backward ops as each other's adjoints.
Draws are integers and carry no gradient; they are returned so an adaptive attacker can replay
them (pass ``sizes``/``offsets``) and differentiate through the same transformation.
Under ``torch.compile(fullgraph=True)`` pass ``sizes``/``offsets`` (draw them outside the graph
with ``draw_resize_pad``): a ``torch.Generator`` cannot be traced.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast import _ext
from vars_fast.ops import _checks, _dispatch

MODES = ("bilinear", "nearest")


def draw_resize_pad(batch: int, out_size: int, min_size: int, generator: Optional[torch.Generator] = None,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """sizes [B] int64 uniform in [min_size, out_size - 1]; offsets [B, 2] (top, left) uniform in
    [0, out_size - size]."""
    if not 1 <= min_size < out_size:
        raise ValueError(f"random_resize_pad: need 1 <= min_size < out_size, got min_size={min_size}, out_size={out_size}")
    sizes = torch.randint(min_size, out_size, (batch,), generator=generator)
    u = torch.rand(batch, 2, generator=generator)
    offsets = torch.floor(u * (out_size - sizes + 1).unsqueeze(1).float()).long()
    return sizes.to(device), offsets.to(device)


def random_resize_pad_reference(x: Tensor, sizes: Tensor, offsets: Tensor, out_size: int,
                                mode: str = "bilinear") -> Tensor:
    """The spec: one F.interpolate per sample, pasted on a zero canvas. x [B,C,H,W] -> [B,C,O,O]."""
    B, C = x.shape[:2]
    out = x.new_zeros(B, C, out_size, out_size)
    for b in range(B):
        s = int(sizes[b])
        r = F.interpolate(x[b:b + 1], size=(s, s), mode=mode, align_corners=False if mode == "bilinear" else None)
        t, l = int(offsets[b, 0]), int(offsets[b, 1])
        out[b:b + 1, :, t:t + s, l:l + s] = r
    return out


def random_resize_pad_grid_sample(x: Tensor, sizes: Tensor, offsets: Tensor, out_size: int) -> Tensor:
    """Batched bilinear formulation: one grid_sample over a per-sample affine grid, then a mask.

    With align_corners=False, output column j of a size-s resize reads source pixel
    (j + 0.5) * W / s - 0.5, i.e. normalised coordinate 2 (j + 0.5) / s - 1; padding_mode
    "border" reproduces F.interpolate's index clamping, and the mask zeroes the padding.
    """
    B, O = x.shape[0], out_size
    pos = torch.arange(O, device=x.device, dtype=torch.float32) + 0.5           # [O]
    s = sizes.to(device=x.device, dtype=torch.float32).view(B, 1)
    rel_y = pos.view(1, O) - offsets[:, 0:1].to(device=x.device, dtype=torch.float32)  # [B, O]
    rel_x = pos.view(1, O) - offsets[:, 1:2].to(device=x.device, dtype=torch.float32)
    gy, gx = 2 * rel_y / s - 1, 2 * rel_x / s - 1
    grid = torch.stack(torch.broadcast_tensors(gx.view(B, 1, O), gy.view(B, O, 1)), dim=-1)  # [B, O, O, 2] (x, y)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((gy.abs() < 1).view(B, 1, O, 1) & (gx.abs() < 1).view(B, 1, 1, O))
    return out * inside.to(out.dtype)


# ---- checks, fake kernels and autograd, shared by the extension op and the Triton op --------

def check_draws(op: str, t: Tensor, sizes: Tensor, offsets: Tensor, mode: str, backward: bool = False) -> None:
    """The kernels' conditions (csrc/common.h ``check_resize_draws``) as torch._check, for the
    fake kernels and the Triton ops. ``t`` is x [B, C, H, W], or grad_out [B, C, O, O] when
    ``backward``. Whether each draw fits the canvas is a value check: the CPU kernel does it."""
    name = "grad_out" if backward else "x"
    _checks.ndim(op, name, t, 4, "[B, C, O, O]" if backward else "[B, C, H, W]")
    if backward:
        torch._check(t.shape[2] == t.shape[3], lambda: f"vars_fast::{op}: grad_out must be [B, C, O, O], got {tuple(t.shape)}")
    _checks.floating(op, name, t)
    _checks.one_of(op, "mode", mode, MODES)
    _checks.vector(op, "sizes", sizes, t.shape[0], dtype=torch.int64)
    torch._check(offsets.dim() == 2 and offsets.shape[0] == t.shape[0] and offsets.shape[1] == 2,
                 lambda: f"vars_fast::{op}: offsets must be [B={t.shape[0]}, 2], got shape {tuple(offsets.shape)}")
    torch._check(offsets.dtype == torch.int64, lambda: f"vars_fast::{op}: offsets must be torch.int64, got {offsets.dtype}")
    _checks.same_device(op, t, sizes, offsets)


def fake_forward(x, sizes, offsets, out_size, mode):
    check_draws("random_resize_pad", x, sizes, offsets, mode)
    torch._check(out_size >= 1, lambda: f"vars_fast::random_resize_pad: out_size must be >= 1, got {out_size}")
    return x.new_empty(x.shape[0], x.shape[1], out_size, out_size)


def fake_backward(grad_out, sizes, offsets, in_h, in_w, mode):
    check_draws("random_resize_pad_backward", grad_out, sizes, offsets, mode, backward=True)
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], in_h, in_w)


def register_autograd(fwd_name: str, fwd_op: Callable, bwd_name: str, bwd_op: Callable) -> None:
    """Autograd for one backend's op pair (``fwd_op`` has the ``random_resize_pad`` schema,
    ``bwd_op`` the ``random_resize_pad_backward`` one). The map is linear in x, so the backward
    is the adjoint of the forward and the forward is the adjoint of the backward: registering
    both gives double backward (and any higher order)."""

    def fwd_setup(ctx, inputs, output):
        x, sizes, offsets, _out_size, mode = inputs
        ctx.save_for_backward(sizes, offsets)
        ctx.hw, ctx.mode = (x.shape[2], x.shape[3]), mode

    def fwd_backward(ctx, grad):
        sizes, offsets = ctx.saved_tensors
        return bwd_op(grad.contiguous(), sizes, offsets, *ctx.hw, ctx.mode), None, None, None, None

    def bwd_setup(ctx, inputs, output):
        grad_out, sizes, offsets, _in_h, _in_w, mode = inputs
        ctx.save_for_backward(sizes, offsets)
        ctx.out_size, ctx.mode = grad_out.shape[2], mode

    def bwd_backward(ctx, gg):
        sizes, offsets = ctx.saved_tensors
        return fwd_op(gg.contiguous(), sizes, offsets, ctx.out_size, ctx.mode), None, None, None, None, None

    torch.library.register_autograd(fwd_name, fwd_backward, setup_context=fwd_setup)
    torch.library.register_autograd(bwd_name, bwd_backward, setup_context=bwd_setup)


if _ext.has_ops() and hasattr(torch.ops.vars_fast, "random_resize_pad"):
    torch.library.register_fake("vars_fast::random_resize_pad")(fake_forward)
    torch.library.register_fake("vars_fast::random_resize_pad_backward")(fake_backward)
    register_autograd("vars_fast::random_resize_pad", torch.ops.vars_fast.random_resize_pad,
                      "vars_fast::random_resize_pad_backward", torch.ops.vars_fast.random_resize_pad_backward)


def _kernel_refusal(x: Tensor, mode: str) -> Optional[str]:
    if x.dim() != 4:
        return f"x must be [B, C, H, W], got shape {tuple(x.shape)}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {x.dtype} is not supported"
    return None


def random_resize_pad(x: Tensor, out_size: int, min_size: int, generator: Optional[torch.Generator] = None,
                      mode: str = "bilinear", sizes: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
                      backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, C, H, W] -> (out [B, C, out_size, out_size], sizes [B] int64, offsets [B, 2] int64).

    Each sample is resized to sizes[b] x sizes[b] (bilinear align_corners=False, or nearest)
    and placed at offsets[b] = (top, left) on a zero canvas. Draws come from ``generator``
    (via ``draw_resize_pad``: sizes in [min_size, out_size - 1]) unless both are given; they
    are returned on x's device so an adaptive attacker can replay and differentiate through them.
    """
    if mode not in MODES:
        raise ValueError(f"random_resize_pad: mode must be one of {MODES}, got {mode!r}")
    if sizes is None or offsets is None:
        sizes, offsets = draw_resize_pad(x.shape[0], out_size, min_size, generator, x.device)
    else:
        sizes = sizes.to(device=x.device, dtype=torch.long)
        offsets = offsets.to(device=x.device, dtype=torch.long)
    why = _kernel_refusal(x, mode)
    b = _dispatch.choose("random_resize_pad", (x, sizes, offsets), backend, triton_ok=why, ext_ok=why)
    if b == "reference":
        out = random_resize_pad_reference(x, sizes, offsets, out_size, mode)
    elif b == "triton":
        # choose() imported vars_fast.ops.triton.random_resize_pad, which registered this op.
        out = torch.ops.vars_fast.random_resize_pad_triton(x, sizes, offsets, out_size, mode)
    else:
        out = torch.ops.vars_fast.random_resize_pad(x, sizes, offsets, out_size, mode)
    return out, sizes, offsets
