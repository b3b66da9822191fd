"""Random resize + zero pad at a random offset, fixed output shape (Xie et al. 2018).

SKELETON: reference only; the kernel work (issue 5) adds registration and backends.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def draw_resize_pad(batch: int, out_size: int, min_size: int, generator: Optional[torch.Generator] = None,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """sizes [B] int64 uniform in [min_size, out_size - 1]; offsets [B, 2] (top, left) uniform in
    [0, out_size - size]."""
    sizes = torch.randint(min_size, out_size, (batch,), generator=generator)
    u = torch.rand(batch, 2, generator=generator)
    offsets = torch.floor(u * (out_size - sizes + 1).unsqueeze(1).float()).long()
    return sizes.to(device), offsets.to(device)


def random_resize_pad(x: Tensor, out_size: int, min_size: int, generator: Optional[torch.Generator] = None,
                      mode: str = "bilinear", sizes: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
                      backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, C, H, W] -> (out [B, C, out_size, out_size], sizes [B], offsets [B, 2]).

    Each sample is resized to sizes[b] x sizes[b] (align_corners=False) and placed at
    offsets[b] = (top, left) on a zero canvas. Draws come from ``generator`` unless given;
    they are returned so that an adaptive attacker can replay and differentiate through them.
    """
    B, C = x.shape[:2]
    if sizes is None or offsets is None:
        sizes, offsets = draw_resize_pad(B, out_size, min_size, generator, x.device)
    out = x.new_zeros(B, C, out_size, out_size)
    for b in range(B):
        s = int(sizes[b])
        r = F.interpolate(x[b:b + 1], size=(s, s), mode=mode, align_corners=False if mode == "bilinear" else None)
        t, l = int(offsets[b, 0]), int(offsets[b, 1])
        out[b:b + 1, :, t:t + s, l:l + s] = r
    return out, sizes, offsets
