"""Benign changes of clean images: what a detector must *not* flag (the false-positive side of
the detection evaluation). Gaussian sensor-like noise and JPEG re-compression, the two things
an ordinary upload pipeline does to a product photo.

Both take float [B,3,S,S] in [0,1] and return float [B,3,S,S] in [0,1] on the input's device.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x + N(0, sigma^2) per pixel (sigma in [0,1] pixel units), clamped to [0,1]; noise drawn
    on the CPU from ``generator`` so that the result does not depend on the device."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return (x + float(sigma) * noise).clamp(0.0, 1.0)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Each image encoded as a JPEG at ``quality`` (1-100, Pillow's libjpeg, 4:2:0 chroma
    subsampling as Pillow's default) and decoded again: the 8-bit rounding plus the codec's
    block quantisation. Pillow rather than torchvision.io, whose codecs are deprecated."""
    import io

    import numpy as np
    from PIL import Image

    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"jpeg quality must be in [1, 100] (got {quality})")
    u8 = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255.0
