"""Triton kernels for info_nce (forward and backward), as ``torch.library.triton_op``.

Registers ``vars_fast::info_nce_triton`` (same schema as the extension's ``vars_fast::info_nce``)
and ``vars_fast::info_nce_triton_backward``; autograd and fake kernels are shared with the
extension op (``vars_fast.ops.info_nce.register_autograd``).

Flash-attention style, no N x M buffer:
  * forward: one program per BLOCK_N anchors, loop over BLOCK_M-candidate tiles, S = za @ zc^T
    (tl.dot), masked online log-sum-exp; writes lse [N] and loss [N].
  * backward: two kernels that recompute S tile by tile: one per anchor block accumulates
    dza = dS @ zc, one per candidate block accumulates dzc = dS^T @ za (no atomics), with
    dS = g/tau * (softmax - onehot(pos)) on the valid set.
The L2 normalisation and its backward are O((N + M) d) torch ops around the kernels.
fp32 tiles use input_precision="ieee" (no TF32) so the loss matches the fp32 reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from vars_fast.ops.info_nce import check_kernel_inputs, fake_backward, fake_forward, register_autograd

_BN, _BM = 32, 32


@triton.jit
def _valid(kk, pos, cgk, gq):
    # [BN, BM] validity: the positive, a global negative (-1) or a negative of the anchor's group.
    return (kk[None, :] == pos[:, None]) | (cgk[None, :] == -1) | (cgk[None, :] == gq[:, None])


@triton.jit
def _fwd_kernel(za_ptr, zc_ptr, pos_ptr, gq_ptr, cg_ptr, lse_ptr, loss_ptr, N, M, D, inv_tau,
                BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    dd = tl.arange(0, BD)
    za = tl.load(za_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    pos = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    gq = tl.load(gq_ptr + rows, mask=rmask, other=-3)
    m = tl.full([BN], float("-inf"), tl.float32)
    l = tl.zeros([BN], tl.float32)
    sp = tl.zeros([BN], tl.float32)
    for k0 in range(0, M, BM):
        kk = k0 + tl.arange(0, BM)
        kmask = kk < M
        zc = tl.load(zc_ptr + kk[:, None] * D + dd[None, :], mask=kmask[:, None] & (dd[None, :] < D), other=0.0)
        s = tl.dot(za, tl.trans(zc), input_precision="ieee") * inv_tau
        cgk = tl.load(cg_ptr + kk, mask=kmask, other=-2)
        ok = _valid(kk, pos, cgk, gq) & kmask[None, :]
        sv = tl.where(ok, s, float("-inf"))
        mn = tl.maximum(m, tl.max(sv, axis=1))
        mn_safe = tl.where(mn == float("-inf"), 0.0, mn)  # rows with nothing valid yet
        l = l * tl.exp(m - mn_safe) + tl.sum(tl.where(ok, tl.exp(s - mn_safe[:, None]), 0.0), axis=1)
        m = mn
        sp += tl.sum(tl.where(kk[None, :] == pos[:, None], s, 0.0), axis=1)
    lse = m + tl.log(l)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, lse - sp, mask=rmask)


@triton.jit
def _dS_tile(za, zc, rows, rmask, kk, kmask, pos_ptr, gq_ptr, cg_ptr, lse_ptr, g_ptr, inv_tau):
    """dS tile [BN, BM] = g_a/tau * (exp(s - lse_a) on valid - onehot(pos_a))."""
    s = tl.dot(za, tl.trans(zc), input_precision="ieee") * inv_tau
    pos = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    gq = tl.load(gq_ptr + rows, mask=rmask, other=-3)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    coef = tl.load(g_ptr + rows, mask=rmask, other=0.0) * inv_tau
    cgk = tl.load(cg_ptr + kk, mask=kmask, other=-2)
    ok = _valid(kk, pos, cgk, gq) & kmask[None, :] & rmask[:, None]
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    p = p - tl.where(kk[None, :] == pos[:, None], 1.0, 0.0)
    return p * coef[:, None]


@triton.jit
def _load_tile(ptr, idx, n, D, BD: tl.constexpr):
    """Rows ``idx`` (masked at ``n``) of a row-major [n, D] matrix, zero-padded to BD columns."""
    dd = tl.arange(0, BD)
    return tl.load(ptr + idx[:, None] * D + dd[None, :], mask=(idx < n)[:, None] & (dd[None, :] < D), other=0.0)


@triton.jit
def _store_tile(ptr, idx, n, D, value, BD: tl.constexpr):
    dd = tl.arange(0, BD)
    tl.store(ptr + idx[:, None] * D + dd[None, :], value, mask=(idx < n)[:, None] & (dd[None, :] < D))


@triton.jit
def _bwd_anchor_kernel(za_ptr, zc_ptr, pos_ptr, gq_ptr, cg_ptr, lse_ptr, g_ptr, dza_ptr, N, M, D, inv_tau,
                       BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """dza = dS @ zc: one block of anchor rows, streaming over every candidate tile."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    za = _load_tile(za_ptr, rows, N, D, BD)
    acc = tl.zeros([BN, BD], tl.float32)
    for k0 in range(0, M, BM):
        kk = k0 + tl.arange(0, BM)
        zc = _load_tile(zc_ptr, kk, M, D, BD)
        ds = _dS_tile(za, zc, rows, rows < N, kk, kk < M, pos_ptr, gq_ptr, cg_ptr, lse_ptr, g_ptr, inv_tau)
        acc += tl.dot(ds, zc, input_precision="ieee")
    _store_tile(dza_ptr, rows, N, D, acc, BD)


@triton.jit
def _bwd_candidate_kernel(za_ptr, zc_ptr, pos_ptr, gq_ptr, cg_ptr, lse_ptr, g_ptr, dzc_ptr, N, M, D, inv_tau,
                          BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """dzc = dS^T @ za: one block of candidates, streaming over every anchor tile (no atomics)."""
    kk = tl.program_id(0) * BM + tl.arange(0, BM)
    zc = _load_tile(zc_ptr, kk, M, D, BD)
    acc = tl.zeros([BM, BD], tl.float32)
    for i0 in range(0, N, BN):
        rows = i0 + tl.arange(0, BN)
        za = _load_tile(za_ptr, rows, N, D, BD)
        acc += tl.dot(tl.trans(_dS_tile(za, zc, rows, rows < N, kk, kk < M, pos_ptr, gq_ptr, cg_ptr, lse_ptr, g_ptr,
                                        inv_tau)), za, input_precision="ieee")
    _store_tile(dzc_ptr, kk, M, D, acc, BD)


def _prep(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
          candidate_group: Tensor):
    za = F.normalize(anchors.float(), dim=1).contiguous()
    zc = F.normalize(candidates.float(), dim=1).contiguous()
    pos = positive_index.to(torch.int32).contiguous()
    gq = torch.where(anchor_group >= 0, anchor_group, -3).to(torch.int32).contiguous()  # -3: no group
    cg = candidate_group.to(torch.int32).contiguous()
    bd = max(16, triton.next_power_of_2(za.shape[1]))
    return za, zc, pos, gq, cg, bd


@triton_op("vars_fast::info_nce_triton", mutates_args=())
def info_nce_triton(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
                    candidate_group: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    check_kernel_inputs("info_nce_triton", anchors, candidates, positive_index, anchor_group, candidate_group)
    za, zc, pos, gq, cg, bd = _prep(anchors, candidates, positive_index, anchor_group, candidate_group)
    N, M, D = za.shape[0], zc.shape[0], za.shape[1]
    lse = torch.empty(N, device=za.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    if N:
        wrap_triton(_fwd_kernel)[(triton.cdiv(N, _BN),)](za, zc, pos, gq, cg, lse, loss, N, M, D, 1.0 / temperature,
                                                         BN=_BN, BM=_BM, BD=bd)
    # lse in the extension op's dtype (fp64 for fp64 inputs), so one fake kernel serves both.
    return loss.to(anchors.dtype), lse.to(torch.float64 if anchors.dtype == torch.float64 else torch.float32)


@triton_op("vars_fast::info_nce_triton_backward", mutates_args=())
def info_nce_triton_backward(grad_loss: Tensor, anchors: Tensor, candidates: Tensor, positive_index: Tensor,
                             anchor_group: Tensor, candidate_group: Tensor, lse: Tensor,
                             temperature: float) -> tuple[Tensor, Tensor]:
    check_kernel_inputs("info_nce_triton_backward", anchors, candidates, positive_index, anchor_group, candidate_group)
    za, zc, pos, gq, cg, bd = _prep(anchors, candidates, positive_index, anchor_group, candidate_group)
    N, M, D = za.shape[0], zc.shape[0], za.shape[1]
    g = grad_loss.float().contiguous()
    lse = lse.float().contiguous()
    dza, dzc = torch.zeros_like(za), torch.zeros_like(zc)
    if N and M:
        args = (za, zc, pos, gq, cg, lse, g)
        wrap_triton(_bwd_anchor_kernel)[(triton.cdiv(N, _BN),)](*args, dza, N, M, D, 1.0 / temperature,
                                                                BN=_BN, BM=_BM, BD=bd)
        wrap_triton(_bwd_candidate_kernel)[(triton.cdiv(M, _BM),)](*args, dzc, N, M, D, 1.0 / temperature,
                                                                   BN=_BN, BM=_BM, BD=bd)
    # normalisation backward: z = x / max(|x|, 1e-12)
    da = _normalize_backward(anchors.float(), za, dza)
    dc = _normalize_backward(candidates.float(), zc, dzc)
    return da.to(anchors.dtype), dc.to(candidates.dtype)


def _normalize_backward(x: Tensor, z: Tensor, dz: Tensor) -> Tensor:
    nrm = x.norm(dim=1, keepdim=True)
    proj = dz - z * (z * dz).sum(1, keepdim=True)
    return torch.where(nrm > 1e-12, proj / nrm.clamp_min(1e-12), dz / 1e-12)


register_autograd("vars_fast::info_nce_triton", info_nce_triton_backward)


# The extension ops' fake kernels (the default one of a triton_op runs its body, which under
# TRITON_INTERPRET=1 would launch the interpreted kernel on fake tensors).
info_nce_triton.register_fake(fake_forward)
info_nce_triton_backward.register_fake(fake_backward)
