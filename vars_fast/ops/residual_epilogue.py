"""Fused epilogue after a conv: out = act(norm_affine(y)) + residual.

SKELETON: reference only; the kernel work (issue 5) adds registration and backends.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def residual_epilogue(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      residual: Optional[Tensor] = None, norm: str = "instance", act: str = "relu",
                      eps: float = 1e-5, running_mean: Optional[Tensor] = None,
                      running_var: Optional[Tensor] = None, training: bool = True,
                      momentum: float = 0.1, backend: str | None = None) -> Tensor:
    """y, residual: [N, C, H, W]; weight, bias: [C] or None; norm: "instance" | "batch";
    act: "relu" | "none". Batch norm updates running stats in training, uses them in eval."""
    if norm == "instance":
        h = F.instance_norm(y, weight=weight, bias=bias, eps=eps)
    elif norm == "batch":
        h = F.batch_norm(y, running_mean, running_var, weight, bias, training=training or running_mean is None,
                         momentum=momentum, eps=eps)
    else:
        raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")
    if act == "relu":
        h = torch.relu(h)
    elif act != "none":
        raise ValueError(f"act must be 'relu' or 'none', got {act!r}")
    return h + residual if residual is not None else h
