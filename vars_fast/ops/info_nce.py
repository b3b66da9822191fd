"""InfoNCE over cosine similarities with grouped negatives (Eq. 8-10).

Backends (chosen in ``_dispatch``): Triton (``vars_fast.ops.triton.info_nce``), the compiled
extension (``vars_fast::info_nce`` / ``info_nce_backward``, CPU and CUDA kernels) and
``info_nce_reference`` below, the spec. The kernels are tiled flash-attention style: an
online log-sum-exp over candidate tiles in the forward, tiles recomputed in the backward,
so memory is O((N + M) d) instead of the reference's several N x M matrices. Only the
per-anchor log-sum-exp [N] is saved for the backward.

How the detector maps its pairs (Eq. 8) onto the arguments: candidates are the batch's
z(x), z(D(x)), z(D(x_adv)) and z(x_adv) rows, anchors the first member of each positive
pair, positive_index the row of its partner; z(x_adv) of item i gets candidate_group i (a
negative only for item i's anchors), the rest -2 (never a negative) or -1 (in-batch
negatives for everyone).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast import _ext
from vars_fast.ops import _checks, _dispatch


def info_nce_reference(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
                       candidate_group: Tensor, temperature: float) -> Tensor:
    """The spec, pure PyTorch (materialises N x M logits). Same arguments as :func:`info_nce`."""
    ct = torch.promote_types(anchors.dtype, torch.float32)  # fp32 math, fp64 stays fp64
    za = F.normalize(anchors.to(ct), dim=1)
    zc = F.normalize(candidates.to(ct), dim=1)
    logits = za @ zc.t() / temperature
    k = torch.arange(zc.shape[0], device=zc.device)
    cg = candidate_group.view(1, -1)
    valid = (cg == -1) | ((cg >= 0) & (cg == anchor_group.view(-1, 1))) | (k.view(1, -1) == positive_index.view(-1, 1))
    logits_m = logits.masked_fill(~valid, float("-inf"))
    pos = logits.gather(1, positive_index.view(-1, 1)).squeeze(1)
    return (torch.logsumexp(logits_m, dim=1) - pos).to(anchors.dtype)


def _kernel_ok(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
               candidate_group: Tensor) -> bool | str:
    """Conditions shared by the compiled and Triton kernels (else: the reference serves)."""
    if anchors.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"anchors dtype {anchors.dtype} is not a float type the kernels handle"
    if candidates.dtype != anchors.dtype:
        return f"candidates dtype {candidates.dtype} differs from anchors dtype {anchors.dtype}"
    if anchors.dim() != 2 or candidates.dim() != 2 or anchors.shape[1] != candidates.shape[1]:
        return f"anchors {tuple(anchors.shape)} / candidates {tuple(candidates.shape)} are not [N, d] / [M, d]"
    if candidates.shape[0] == 0:
        return "no candidates"
    for name, t in (("positive_index", positive_index), ("anchor_group", anchor_group),
                    ("candidate_group", candidate_group)):
        if t.dtype.is_floating_point or t.dim() != 1:
            return f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}"
    return True


# ---- autograd + fake kernels, shared by the extension op and the Triton op ----------------

def check_kernel_inputs(op: str, anchors: Tensor, candidates: Tensor, positive_index: Tensor,
                        anchor_group: Tensor, candidate_group: Tensor) -> None:
    """The kernels' conditions (csrc/common.h ``check_info_nce_inputs``) as torch._check, for
    the fake kernels and the Triton ops."""
    _checks.ndim(op, "anchors", anchors, 2, "[N, d]")
    _checks.ndim(op, "candidates", candidates, 2, "[M, d]")
    torch._check(anchors.shape[1] == candidates.shape[1],
                 lambda: f"vars_fast::{op}: anchors {tuple(anchors.shape)} and candidates {tuple(candidates.shape)} must share d")
    _checks.floating(op, "anchors", anchors)
    _checks.same_dtype(op, ("anchors", "candidates"), (anchors, candidates))
    n, m = anchors.shape[0], candidates.shape[0]
    _checks.vector(op, "positive_index", positive_index, n, integer=True)
    _checks.vector(op, "anchor_group", anchor_group, n, integer=True)
    _checks.vector(op, "candidate_group", candidate_group, m, integer=True)
    _checks.same_device(op, anchors, candidates, positive_index, anchor_group, candidate_group)


def fake_forward(anchors, candidates, positive_index, anchor_group, candidate_group, temperature):
    check_kernel_inputs("info_nce", anchors, candidates, positive_index, anchor_group, candidate_group)
    sdt = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    n = anchors.shape[0]
    return anchors.new_empty((n,)), anchors.new_empty((n,), dtype=sdt)


def fake_backward(grad_loss, anchors, candidates, positive_index, anchor_group, candidate_group, lse, temperature):
    op = "info_nce_backward"
    check_kernel_inputs(op, anchors, candidates, positive_index, anchor_group, candidate_group)
    _checks.vector(op, "grad_loss", grad_loss, anchors.shape[0])
    _checks.vector(op, "lse", lse, anchors.shape[0])
    _checks.same_device(op, anchors, grad_loss, lse)
    return torch.empty_like(anchors, memory_format=torch.contiguous_format), \
        torch.empty_like(candidates, memory_format=torch.contiguous_format)


def register_autograd(fwd_name: str, backward_op: Callable) -> None:
    """Attach the backward (``backward_op`` has the ``info_nce_backward`` schema) to ``fwd_name``."""

    def setup_context(ctx, inputs, output):
        anchors, candidates, pos, ag, cg, temperature = inputs
        _loss, lse = output
        ctx.save_for_backward(anchors, candidates, pos, ag, cg, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_loss, _g_lse):
        anchors, candidates, pos, ag, cg, lse = ctx.saved_tensors
        da, dc = backward_op(grad_loss, anchors, candidates, pos, ag, cg, lse, ctx.temperature)
        return da, dc, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


if _ext.has_ops() and hasattr(torch.ops.vars_fast, "info_nce"):
    torch.library.register_fake("vars_fast::info_nce")(fake_forward)
    torch.library.register_fake("vars_fast::info_nce_backward")(fake_backward)
    register_autograd("vars_fast::info_nce", torch.ops.vars_fast.info_nce_backward)


# ---- public function ------------------------------------------------------------------------

def info_nce(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
             candidate_group: Tensor, temperature: float, backend: str | None = None) -> Tensor:
    """Per-anchor loss [N].

    anchors [N, d], candidates [M, d] (L2-normalised inside). For anchor a, the denominator
    runs over candidates k with k == positive_index[a], or candidate_group[k] == -1 (a
    negative for every anchor), or candidate_group[k] == anchor_group[a] >= 0 (a negative
    for anchors of that group); candidate_group[k] == -2 means "never a negative".
    loss[a] = -s(a, p)/tau + logsumexp_{k in C(a)} s(a, k)/tau.
    positive_index, anchor_group [N], candidate_group [M]: integer tensors. Differentiable in
    anchors and candidates. ``backend``: see ``vars_fast.ops._dispatch``.
    """
    ok = _kernel_ok(anchors, candidates, positive_index, anchor_group, candidate_group)
    tri_ok = "the Triton kernels compute in fp32 (fp64 goes to the extension or the reference)" \
        if ok is True and anchors.dtype == torch.float64 else ok
    which = _dispatch.choose("info_nce", (anchors, candidates, positive_index, anchor_group, candidate_group),
                             backend, triton_ok=tri_ok, ext_ok=ok)
    if which == "reference":
        return info_nce_reference(anchors, candidates, positive_index, anchor_group, candidate_group, temperature)
    if which == "triton":
        op = _dispatch.triton_module("info_nce")[0].info_nce_triton
    else:
        op = torch.ops.vars_fast.info_nce
    loss, _lse = op(anchors, candidates, positive_index, anchor_group, candidate_group, float(temperature))
    return loss
