"""InfoNCE over cosine similarities with grouped negatives (Eq. 8-10).

SKELETON: reference only; the kernel work (issue 5) adds the tiled kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(anchors: Tensor, candidates: Tensor, positive_index: Tensor, anchor_group: Tensor,
             candidate_group: Tensor, temperature: float, backend: str | None = None) -> Tensor:
    """Per-anchor loss [N].

    anchors [N, d], candidates [M, d] (L2-normalised inside). For anchor a, the denominator
    runs over candidates k with k == positive_index[a], or candidate_group[k] == -1 (a
    negative for every anchor), or candidate_group[k] == anchor_group[a] >= 0 (a negative
    for anchors of that group); candidate_group[k] == -2 means "never a negative".
    loss[a] = -s(a, p)/tau + logsumexp_{k in C(a)} s(a, k)/tau.
    """
    za = F.normalize(anchors.float(), dim=1)
    zc = F.normalize(candidates.float(), dim=1)
    logits = za @ zc.t() / temperature
    k = torch.arange(zc.shape[0], device=zc.device)
    cg = candidate_group.view(1, -1)
    valid = (cg == -1) | ((cg >= 0) & (cg == anchor_group.view(-1, 1))) | (k.view(1, -1) == positive_index.view(-1, 1))
    logits_m = logits.masked_fill(~valid, float("-inf"))
    pos = logits.gather(1, positive_index.view(-1, 1)).squeeze(1)
    return (torch.logsumexp(logits_m, dim=1) - pos).to(anchors.dtype)
