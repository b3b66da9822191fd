"""Fused epilogue after a conv: out = act(norm_affine(y)) + residual.

The denoiser's residual blocks call it twice per block: (norm + ReLU) after conv1 and
(norm + residual add, no activation) after conv2. Convolutions stay in cuDNN / oneDNN.

Backends (chosen in ``_dispatch``): Triton (``vars_fast.ops.triton.residual_epilogue``), the
compiled extension (``vars_fast::residual_epilogue`` with CPU and CUDA kernels) and
``residual_epilogue_reference`` below, the spec. The kernels return the normalisation
statistics (mean, rstd) and the backward recomputes the ReLU mask from y, so nothing but y
and [N, C] statistics is saved for autograd. Batch-norm running statistics are updated
here, in Python, from the returned batch statistics (C numbers, not worth a kernel).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast import _ext
from vars_fast.ops import _checks, _dispatch

_NORMS = ("instance", "batch")
_ACTS = ("relu", "none")


def residual_epilogue_reference(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                residual: Optional[Tensor] = None, norm: str = "instance", act: str = "relu",
                                eps: float = 1e-5, running_mean: Optional[Tensor] = None,
                                running_var: Optional[Tensor] = None, training: bool = True,
                                momentum: float = 0.1) -> Tensor:
    """The spec, pure PyTorch. Same arguments as :func:`residual_epilogue`."""
    _check_args(norm, act)
    if norm == "instance":
        h = F.instance_norm(y, weight=weight, bias=bias, eps=eps)
    else:
        h = F.batch_norm(y, running_mean, running_var, weight, bias, training=training or running_mean is None,
                         momentum=momentum, eps=eps)
    if act == "relu":
        h = torch.relu(h)
    return h + residual if residual is not None else h


def _check_args(norm: str, act: str) -> None:
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")
    if act not in _ACTS:
        raise ValueError(f"act must be 'relu' or 'none', got {act!r}")


def _kernel_ok(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> bool | str:
    """Conditions shared by the compiled and Triton kernels (else: the reference serves)."""
    if y.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"y dtype {y.dtype} is not a float type the kernels handle"
    if y.dim() < 2:
        return f"y must be [N, C, ...], got shape {tuple(y.shape)}"
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype):
        return f"residual {tuple(residual.shape)}/{residual.dtype} does not match y {tuple(y.shape)}/{y.dtype}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != y.shape[1]):
            return f"{name} must be [C = {y.shape[1]}], got shape {tuple(t.shape)}"
    return True


# ---- autograd + fake kernels, shared by the extension op and the Triton op ----------------

def stats_shape(y: Tensor, norm: str) -> tuple[int, ...]:
    return (y.shape[1],) if norm == "batch" else (y.shape[0], y.shape[1])


def out_like(y: Tensor) -> Tensor:
    """Empty output in the layout the kernels write: channels_last stays channels_last, anything
    else becomes NCHW-contiguous."""
    cl = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    return torch.empty_like(y, memory_format=torch.channels_last if cl else torch.contiguous_format)


def _check_common(op: str, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], norm: str) -> None:
    _checks.ndim(op, "y", y, 2, "[N, C, ...]", at_least=True)
    _checks.floating(op, "y", y)
    _checks.one_of(op, "norm", norm, _NORMS)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.vector(op, name, t, y.shape[1])
    _checks.same_device(op, y, weight, bias)


def check_kernel_inputs(op: str, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        norm: str, use_input_stats: bool) -> None:
    """The forward kernels' conditions as torch._check, for the fake kernels and the Triton ops."""
    _check_common(op, y, weight, bias, norm)
    if residual is not None:
        _checks.same_shape(op, ("y", "residual"), (y, residual))
        _checks.same_dtype(op, ("y", "residual"), (y, residual))
    torch._check(norm == "batch" or use_input_stats,
                 lambda: f"vars_fast::{op}: instance norm always uses input statistics")
    if not use_input_stats:
        torch._check(running_mean is not None and running_var is not None,
                     lambda: f"vars_fast::{op}: batch-norm eval (use_input_stats=False) needs running_mean and running_var")
        _checks.vector(op, "running_mean", running_mean, y.shape[1])
        _checks.vector(op, "running_var", running_var, y.shape[1])
    _checks.same_device(op, y, residual, running_mean, running_var)


def check_backward_inputs(op: str, grad_out: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, rstd: Tensor, norm: str) -> None:
    """The backward kernels' conditions as torch._check."""
    _check_common(op, y, weight, bias, norm)
    _checks.same_shape(op, ("y", "grad_out"), (y, grad_out))
    _checks.same_dtype(op, ("y", "grad_out"), (y, grad_out))
    want = stats_shape(y, norm)
    for name, t in (("mean", mean), ("rstd", rstd)):
        torch._check(t.numel() == math.prod(want),
                     lambda: f"vars_fast::{op}: {name} must hold {want} statistics, got shape {tuple(t.shape)}")
    _checks.same_device(op, y, grad_out, mean, rstd)


def fake_forward(y, weight, bias, residual, running_mean, running_var, norm, relu, use_input_stats, eps):
    check_kernel_inputs("residual_epilogue", y, weight, bias, residual, running_mean, running_var, norm,
                        use_input_stats)
    sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    shape = stats_shape(y, norm)
    return out_like(y), y.new_empty(shape, dtype=sdt), y.new_empty(shape, dtype=sdt)


def fake_backward(grad_out, y, weight, bias, mean, rstd, norm, relu, use_input_stats):
    check_backward_inputs("residual_epilogue_backward", grad_out, y, weight, bias, mean, rstd, norm)
    sdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    return out_like(y), y.new_empty((y.shape[1],), dtype=sdt), y.new_empty((y.shape[1],), dtype=sdt)


def register_autograd(fwd_name: str, backward_op: Callable) -> None:
    """Attach the backward (``backward_op`` has the ``residual_epilogue_backward`` schema) to
    the forward op ``fwd_name``."""

    def setup_context(ctx, inputs, output):
        y, weight, bias, residual, _rm, _rv, norm, relu, use_input_stats, _eps = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(y, weight, bias, mean, rstd)
        ctx.cfg = (norm, relu, use_input_stats, residual is not None)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_out, _g_mean, _g_rstd):
        y, weight, bias, mean, rstd = ctx.saved_tensors
        norm, relu, use_input_stats, has_res = ctx.cfg
        dy, dw, db = backward_op(grad_out, y, weight, bias, mean, rstd, norm, relu, use_input_stats)
        return (dy, None if weight is None else dw.to(weight.dtype), None if bias is None else db.to(bias.dtype),
                grad_out if has_res else None, None, None, None, None, None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


if _ext.has_ops() and hasattr(torch.ops.vars_fast, "residual_epilogue"):
    torch.library.register_fake("vars_fast::residual_epilogue")(fake_forward)
    torch.library.register_fake("vars_fast::residual_epilogue_backward")(fake_backward)
    register_autograd("vars_fast::residual_epilogue", torch.ops.vars_fast.residual_epilogue_backward)


# ---- public function ------------------------------------------------------------------------

def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, rstd: Tensor, eps: float,
                    momentum: float, count: int) -> None:
    """F.batch_norm's update: EMA of the batch mean and of the *unbiased* batch variance."""
    with torch.no_grad():
        var = rstd.double().pow(-2).sub_(eps).clamp_min_(0) * (count / max(count - 1, 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def residual_epilogue(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      residual: Optional[Tensor] = None, norm: str = "instance", act: str = "relu",
                      eps: float = 1e-5, running_mean: Optional[Tensor] = None,
                      running_var: Optional[Tensor] = None, training: bool = True,
                      momentum: float = 0.1, backend: str | None = None) -> Tensor:
    """out = act(norm_affine(y)) + residual.

    y, residual: [N, C, H, W] (NCHW or channels_last; out keeps y's layout); weight, bias: [C]
    or None; norm: "instance" (statistics per sample and channel) | "batch" (per channel;
    updates running_mean / running_var in training, uses them in eval); act: "relu" | "none".
    Differentiable in y, weight, bias and residual. ``backend``: see ``vars_fast.ops._dispatch``.
    """
    _check_args(norm, act)
    use_input_stats = norm == "instance" or training or running_mean is None
    tensors = [t for t in (y, weight, bias, residual, running_mean, running_var) if t is not None]
    ok = _kernel_ok(y, weight, bias, residual)
    tri_ok = "the Triton kernels compute in fp32 (fp64 goes to the extension or the reference)" \
        if ok is True and y.dtype == torch.float64 else ok
    which = _dispatch.choose("residual_epilogue", tensors, backend, triton_ok=tri_ok, ext_ok=ok)
    if which == "reference":
        return residual_epilogue_reference(y, weight, bias, residual, norm, act, eps, running_mean, running_var,
                                           training, momentum)
    if which == "triton":
        op = _dispatch.triton_module("residual_epilogue")[0].residual_epilogue_triton
    else:
        op = torch.ops.vars_fast.residual_epilogue
    rm, rv = (None, None) if use_input_stats else (running_mean, running_var)
    out, mean, rstd = op(y, weight, bias, residual, rm, rv, norm, act == "relu", use_input_stats, float(eps))
    if norm == "batch" and training and running_mean is not None and running_var is not None:
        _update_running(running_mean, running_var, mean, rstd, eps, momentum, y.numel() // y.shape[1])
    return out
