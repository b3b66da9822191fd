"""The image denoiser D of Sec. 3.3 / Fig. 4.

    x [B,3,H,W] -> 9x9 conv -> n_res_blocks x ResBlock(3x3) -> GlobalBlock (one ViT block over
    patch tokens) -> 2 x separable 3x3 conv -> 9x9 conv -> r;   D(x) = clamp(x + r, 0, 1)

Readings of the figure that are ours (the paper gives none of these):

* "Separated 3x3 convs" = depthwise-separable convolutions: a depthwise 3x3 (one filter per
  channel) followed by a pointwise 1x1, then ReLU; two of them.
* The network predicts a residual r that is added to its input, and the sum is clamped to
  [0, 1]. Clamp rather than sigmoid: a sigmoid cannot represent the identity on pixels at 0 or
  1 (their logit is infinite), and the catalogue has many saturated pixels (white backgrounds).
* Identity-friendly init: the 9x9 output conv is zero-initialised (D = identity at step 0), the
  last norm of every residual block has zero gain (each block starts as identity, as in
  "zero-gamma" ResNets) and the transformer block's token-to-pixel projection starts at zero.
  Clean images therefore pass unchanged early in training, which is what keeps clean HR@10.
* No downsampling in the conv path: every conv has stride 1 and "same" padding. The global
  block patchifies with a reshape (not a strided conv), pads H and W up to a multiple of the
  patch size with edge replication, and crops back afterwards, so any H x W works (37x41 too).
* The learned positional embedding is sized for ``image_size``; other sizes interpolate it
  bilinearly to the new token grid.
* ``zero_mean_residual`` (off by default) subtracts r's spatial mean per image and channel, so
  that D cannot shift the colours of every image: the shift is most of the pattern D learns
  (docs/results/denoiser_fidelity.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.ops import residual_epilogue


class _Norm(nn.Module):
    """Affine parameters (+ running stats for batch norm) consumed by ``residual_epilogue``."""

    def __init__(self, channels: int, kind: str, gain: float = 1.0):
        super().__init__()
        if kind not in ("instance", "batch"):
            raise ValueError(f"defense.norm must be 'instance' or 'batch', got {kind!r}")
        self.kind = kind
        self.weight = nn.Parameter(torch.full((channels,), float(gain)))
        self.bias = nn.Parameter(torch.zeros(channels))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        else:
            self.running_mean = self.running_var = None

    def epilogue(self, y: Tensor, act: str, residual: Tensor | None = None) -> Tensor:
        return residual_epilogue(y, self.weight, self.bias, residual=residual, norm=self.kind, act=act,
                                 running_mean=self.running_mean, running_var=self.running_var,
                                 training=self.training)


class ResBlock(nn.Module):
    """3x3 conv -> norm+ReLU -> 3x3 conv -> norm -> + x (the norm/act/add are one fused op)."""

    def __init__(self, width: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = _Norm(width, norm)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = _Norm(width, norm, gain=0.0)  # zero gain: the block starts as identity

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1.epilogue(self.conv1(x), act="relu")
        return self.norm2.epilogue(self.conv2(h), act="none", residual=x)


class GlobalBlock(nn.Module):
    """One pre-norm transformer block with global attention over patch tokens, as a residual
    on the feature map: [B,C,H,W] -> [B,C,H,W]."""

    def __init__(self, width: int, patch_size: int, dim: int, heads: int, mlp_ratio: float, image_size: int,
                 unpatchify: str = "pixel"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"defense.embed_dim ({dim}) must be divisible by defense.heads ({heads})")
        if unpatchify not in ("pixel", "smooth"):
            raise ValueError(f"defense.unpatchify must be 'pixel' or 'smooth', got {unpatchify!r}")
        self.p, self.heads, self.unpatchify = patch_size, heads, unpatchify
        self.embed = nn.Linear(width * patch_size * patch_size, dim)
        g = math.ceil(image_size / patch_size)
        self.pos = nn.Parameter(torch.randn(1, dim, g, g) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.unembed = nn.Linear(dim, width * (patch_size * patch_size if unpatchify == "pixel" else 1))
        nn.init.zeros_(self.unembed.weight)  # the block starts as identity on the feature map
        nn.init.zeros_(self.unembed.bias)

    def _pos(self, gh: int, gw: int) -> Tensor:
        pos = self.pos
        if pos.shape[-2:] != (gh, gw):
            pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # [1, gh*gw, dim]

    # Inference copies (the screener) set this: with NHWC input, tokens are taken in
    # (row, col, channel) order, so patchify and unpatchify copy runs of p*C contiguous values
    # instead of gathering single channels, and the embed/unembed weights are permuted to match.
    # Same products; the embedding sums them in another order (equal to float rounding).
    # Speed-up: docs/results/defaults.md.
    nhwc_tokens = False

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.p
        ph, pw = (-H) % p, (-W) % p
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        gh, gw = (H + ph) // p, (W + pw) // p
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fast = nhwc and self.nhwc_tokens
        if fast:  # [B,gh,p,gw,p,C] -> [B, gh*gw, p*p*C]
            tok = xp.permute(0, 2, 3, 1).reshape(B, gh, p, gw, p, C).permute(0, 1, 3, 2, 4, 5)
            tok = tok.reshape(B, gh * gw, p * p * C)
            w_in = self.embed.weight.view(-1, C, p, p).permute(0, 2, 3, 1).reshape(-1, p * p * C)
            t = F.linear(tok, w_in, self.embed.bias)
        else:  # patchify: [B,C,gh,p,gw,p] -> [B, gh*gw, C*p*p]
            tok = xp.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
            t = self.embed(tok)
        t = t + self._pos(gh, gw).to(tok.dtype)
        q, k, v = self.qkv(self.norm1(t)).reshape(B, gh * gw, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # fused attention, [B, heads, N, d]
        t = t + self.proj(a.transpose(1, 2).reshape(B, gh * gw, -1))
        t = t + self.mlp(self.norm2(t))
        if self.unpatchify == "smooth":
            # one C-vector per token, bilinearly upsampled to the pixels: nothing here depends on
            # the position inside a patch, so no pattern with the patch period can come out
            u = self.unembed(t).transpose(1, 2).reshape(B, C, gh, gw)
            out = F.interpolate(u, size=(gh * p, gw * p), mode="bilinear", align_corners=False)
            if nhwc:
                out = out.contiguous(memory_format=torch.channels_last)
        elif fast:
            w_out = self.unembed.weight.view(C, p, p, -1).permute(1, 2, 0, 3).reshape(p * p * C, -1)
            b_out = self.unembed.bias.view(C, p, p).permute(1, 2, 0).reshape(-1)
            u = F.linear(t, w_out, b_out).reshape(B, gh, gw, p, p, C).permute(0, 1, 3, 2, 4, 5)
            out = u.reshape(B, gh * p, gw * p, C).permute(0, 3, 1, 2)
        elif nhwc:
            # NHWC input: lay the map out in NHWC too (same values), or the add below mixes
            # layouts and takes the slow strided path
            u = self.unembed(t).reshape(B, gh, gw, C, p, p)
            out = u.permute(0, 1, 4, 2, 5, 3).reshape(B, gh * p, gw * p, C).permute(0, 3, 1, 2)
        else:
            u = self.unembed(t).reshape(B, gh, gw, C, p, p)
            out = u.permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)
        return x + out[:, :, :H, :W]


class SepConv(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 + ReLU (our reading of Fig. 4's "separated 3x3 convs")."""

    def __init__(self, width: int):
        super().__init__()
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        # in place: the conv's output is not needed by its backward (a 2nd 8 MB pass saved
        # per call at batch 32, 16 ch, 64 px); same values and gradients
        return torch.relu_(self.pw(self.dw(x)))


class Denoiser(nn.Module):
    """D: [B,3,H,W] in [0,1] -> [B,3,H,W] in [0,1]; any H, W (see the module docstring).

    The constructor takes only plain numbers/strings so that ``kwargs()`` can be stored in a
    weights_only checkpoint and the module rebuilt from it.
    """

    def __init__(self, width: int = 32, n_res_blocks: int = 9, norm: str = "instance", patch_size: int = 8,
                 heads: int = 4, embed_dim: int = 128, mlp_ratio: float = 2.0, image_size: int = 64,
                 unpatchify: str = "pixel", zero_mean_residual: bool = False):
        super().__init__()
        self._kwargs = dict(width=width, n_res_blocks=n_res_blocks, norm=norm, patch_size=patch_size, heads=heads,
                            embed_dim=embed_dim, mlp_ratio=mlp_ratio, image_size=image_size, unpatchify=unpatchify,
                            zero_mean_residual=bool(zero_mean_residual))
        self.zero_mean_residual = bool(zero_mean_residual)
        self.conv_in = nn.Conv2d(3, width, 9, padding=4, bias=False)
        self.norm_in = _Norm(width, norm)
        self.blocks = nn.ModuleList(ResBlock(width, norm) for _ in range(n_res_blocks))
        self.glob = GlobalBlock(width, patch_size, embed_dim, heads, mlp_ratio, image_size, unpatchify)
        self.sep = nn.Sequential(SepConv(width), SepConv(width))
        self.conv_out = nn.Conv2d(width, 3, 9, padding=4)
        nn.init.zeros_(self.conv_out.weight)  # D(x) = x at init
        nn.init.zeros_(self.conv_out.bias)

    def kwargs(self) -> dict:
        return dict(self._kwargs)

    def residual(self, x: Tensor) -> Tensor:
        """The predicted correction r (unclamped), [B,3,H,W]."""
        h = self.norm_in.epilogue(self.conv_in(x), act="relu")
        for blk in self.blocks:
            h = blk(h)
        h = self.glob(h)
        r = self.conv_out(self.sep(h))
        return r - r.mean(dim=(2, 3), keepdim=True) if self.zero_mean_residual else r

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.residual(x).to(x.dtype)).clamp(0.0, 1.0)
