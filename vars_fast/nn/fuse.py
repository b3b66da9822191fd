"""Model rewrites that keep a frozen model's function and make it faster: checked copies for
attacking, re-encoding, screening and the defence's frozen paths.

An attack runs the encoder forward *and* backward (input gradient) T times per image, with
frozen weights. Two rewrites pay off there and never change the model the evaluation uses:

* **BatchNorm folding**: an eval-mode BatchNorm2d that directly consumes a conv's output is an
  affine map; folding it into the conv's weight and bias removes the BN forward and backward.
* **channels_last**: the backbone's convs (depthwise ones especially) run faster in NHWC on
  CPU with oneDNN; the Backbone converts its input itself when its weights are NHWC.

Each rewrite's speed-up is in docs/results/defaults.md.

Which BN follows which conv is found by tracing one forward with hooks (the BN's input must
be the very tensor the conv returned), so no architecture is hard-coded; the copy is checked
against the original on the example and discarded (with the original returned) if it differs.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _modules(rec: nn.Module) -> list[nn.Module]:
    # VBPR/AMR hold the backbone by reference (not a submodule): include it explicitly
    mods = [rec]
    bb = getattr(rec, "backbone", None)
    if isinstance(bb, nn.Module):
        mods.append(bb)
    return mods


@torch.no_grad()
def fold_batchnorm(modules: list[nn.Module], run) -> int:
    """Fold every eval BatchNorm2d fed directly by a Conv2d into that conv, in place.

    modules: the modules to search; run: a no-argument callable doing one forward through
    them. Returns the number of folded pairs (the BNs are replaced by ``nn.Identity``).
    """
    last: dict = {}
    pairs: list[tuple[nn.Conv2d, nn.Module, str, nn.BatchNorm2d]] = []
    hooks = []
    for root in modules:
        for name, m in root.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(lambda mod, i, o: last.__setitem__("conv", (mod, o))))
            elif isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats:
                def pre(mod, inp, root=root, name=name):
                    c = last.get("conv")
                    if c is not None and inp[0] is c[1] and all(p[3] is not mod for p in pairs):
                        pairs.append((c[0], root, name, mod))
                hooks.append(m.register_forward_pre_hook(pre))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    for conv, root, name, bn in pairs:
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
        setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return len(pairs)


class SamePadConv2d(nn.Conv2d):
    """TF-"same" padding for a strided conv without a padded copy of the activation.

    The "same" rule pads ``p = max((ceil(i/s)-1)*s + k - i, 0)`` per side, ``p//2`` before and
    ``p - p//2`` after: at most one more zero after than before. Convolving with the kernel
    prefixed by one zero row/column and symmetric padding ``p - p//2`` visits exactly the same
    input pixels with the same weights (the extra tap multiplies a zero weight), so the result
    is the same and the separate ``F.pad`` copy disappears. Which dims need the prefix depends on
    the input size's parity, so it is decided per call. Dilation 1 only.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads, prefix = [], []
        for i, k, st in zip(x.shape[-2:], self.weight.shape[-2:], self.stride):
            p = max((-(-i // st) - 1) * st + k - i, 0)
            pads.append(p - p // 2)
            prefix.append(p - p // 2 - p // 2)  # 0 or 1 zero tap before the kernel
        w = self.weight
        if any(prefix):
            nhwc = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            w = nn.functional.pad(w, [prefix[1], 0, prefix[0], 0])
            w = w.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return nn.functional.conv2d(x, w, self.bias, self.stride, tuple(pads), 1, self.groups)


class PolyphaseConv2d(nn.Module):
    """A stride-1 "same" conv with few output channels, computed on the space-to-depth view.

    oneDNN computes output channels in 16-wide vectors, so the denoiser's 9x9 conv to 3 RGB
    channels does the work of 16 (16->3 and 16->16 9x9 take the same time). With
    r = 2, space-to-depth turns [B,C,H,W] into [B,4C,H/2,W/2] (channel (a,b,c) holds pixel
    (2m+a, 2n+b) of channel c); output pixel (2m+a, 2n+b) of channel o is output channel
    (a,b,o) of a 5x5 conv there whose weight holds the original taps at their phase (zeros
    elsewhere); depth-to-space puts it back. Same products, summed in another order (equal to
    float rounding). Odd H or W: the original conv. The (a,b,c) channel order (not
    ``pixel_unshuffle``'s (c,a,b)) makes both rearrangements copies of contiguous runs in NHWC.
    """

    def __init__(self, conv: nn.Conv2d, r: int = 2):
        super().__init__()
        co, ci, kh, kw = conv.weight.shape
        if (tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) or conv.groups != 1
                or tuple(conv.padding) != ((kh - 1) // 2, (kw - 1) // 2) or kh % 2 == 0 or kw % 2 == 0):
            raise ValueError("PolyphaseConv2d: needs a stride-1, ungrouped conv with odd kernels and 'same' padding")
        self.conv, self.r = conv, r
        w = conv.weight.detach()
        taps = []
        for k in (kh, kw):  # tap u of the new kernel covers original offsets r*u + phase, u in [lo, hi]
            pad = (k - 1) // 2
            taps.append((-pad // r, (r - 1 + k - 1 - pad) // r))
        (lo_h, hi_h), (lo_w, hi_w) = taps
        big = w.new_zeros(co, r, r, ci, r, r, hi_h - lo_h + 1, hi_w - lo_w + 1)
        for a in range(r):
            for b in range(r):
                for c in range(r):
                    for d in range(r):
                        for u in range(lo_h, hi_h + 1):
                            i = r * u + c - a + (kh - 1) // 2
                            for v in range(lo_w, hi_w + 1):
                                j = r * v + d - b + (kw - 1) // 2
                                if 0 <= i < kh and 0 <= j < kw:
                                    big[:, a, b, :, c, d, u - lo_h, v - lo_w] = w[:, :, i, j]
        big = big.permute(1, 2, 0, 4, 5, 3, 6, 7)  # channels (a, b, o) out, (c, d, i) in
        self.register_buffer("weight", big.reshape(co * r * r, ci * r * r, *big.shape[-2:]).contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().repeat(r * r))
        assert (-lo_h, -lo_w) == (hi_h, hi_w)  # odd kernels: the new kernel is centred
        self.padding = (hi_h, hi_w)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        r = self.r
        if H % r or W % r:
            return self.conv(x)
        # [B,H,W,C] -> [B,H/r,W/r,(a,b,c)], viewed as NCHW (memory stays NHWC)
        xs = x.permute(0, 2, 3, 1).reshape(B, H // r, r, W // r, r, C).permute(0, 1, 3, 2, 4, 5)
        xs = xs.reshape(B, H // r, W // r, r * r * C).permute(0, 3, 1, 2)
        y = nn.functional.conv2d(xs, self.weight, self.bias, padding=self.padding)
        co = y.shape[1] // (r * r)
        y = y.permute(0, 2, 3, 1).reshape(B, H // r, W // r, r, r, co).permute(0, 1, 3, 2, 4, 5)
        out = y.reshape(B, H, W, co).permute(0, 3, 1, 2)
        nhwc_in = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out if nhwc_in else out.contiguous()


def polyphase_copy(model: nn.Module, run, max_out: int = 4, rtol: float = 1e-3) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of ``model`` whose stride-1 "same" convs with at most ``max_out``
    output channels run as ``PolyphaseConv2d``, checked on ``run(m) -> Tensor`` like
    ``folded_copy`` and each conv on its own on random input (a zero-initialised, untrained
    output conv would pass the model check whatever the rewrite did); returns (copy, number
    rewritten) or (``model``, 0). Inference only."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = run(model).float()
        cand = copy.deepcopy(model).eval()
        n = 0
        for parent in list(cand.modules()):
            for name, m in list(parent.named_children()):
                if type(m) is nn.Conv2d and m.out_channels <= max_out:
                    try:
                        poly = PolyphaseConv2d(m)
                    except ValueError:
                        continue
                    side = 2 * max(m.kernel_size) + 2
                    x = torch.randn(2, m.in_channels, side, side, generator=g).to(m.weight)
                    want = m(x)
                    if not torch.allclose(poly(x), want, rtol=rtol, atol=rtol * float(want.abs().mean().clamp_min(1e-6))):
                        return model, 0
                    setattr(parent, name, poly)
                    n += 1
        got = run(cand).float() if n else ref
    if n and torch.allclose(got, ref, rtol=rtol, atol=rtol * float(ref.abs().mean().clamp_min(1e-6))):
        return cand, n
    return model, 0


def streamline(modules: list[nn.Module], inplace_relu6: bool = False, strided: bool = False) -> int:
    """Exact rewrites of TF-"same"-padded convs (efficientnet_lite_pytorch), in place.

    A stride-1, odd-kernel ``Conv2dDynamicSamePadding`` pads symmetrically by (k-1)/2 with a
    separate ``F.pad`` (a copy of the activation) and a Python size computation per call: it
    becomes a plain ``nn.Conv2d`` with that padding (same arithmetic, no copy). ``strided``:
    strided ones (one more zero after than before) become ``SamePadConv2d`` (no copy either;
    equal to float rounding: in NHWC the conv's summation order differs). Off for the attack
    encoders (``fast_copy``), so that their results stay bit-identical to the plain model's;
    on for inference copies.
    ``inplace_relu6``: ReLU6 writes into its input (inference only: the pre-activation is never
    reused there). Returns the number of convs rewritten.
    """
    n = 0
    for root in modules:
        for m in root.modules():
            if type(m).__name__ == "Conv2dDynamicSamePadding" and tuple(m.padding) == (0, 0):
                if (tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1)
                        and all(k % 2 == 1 for k in m.kernel_size)):
                    m.__class__ = nn.Conv2d
                    m.padding = tuple((k - 1) // 2 for k in m.kernel_size)
                elif strided and tuple(m.dilation) == (1, 1):
                    m.__class__ = SamePadConv2d
                    m.stride = tuple(m.stride)
                else:
                    continue
                n += 1
            elif isinstance(m, nn.ReLU6) and inplace_relu6:
                m.inplace = True
    return n


def fast_copy(rec: nn.Module, example: Tensor, channels_last: bool = True, fold: bool = True,
              rtol: float = 1e-3) -> nn.Module:
    """A frozen deep copy of ``rec`` (and its backbone) with BN folded and NHWC weights.

    example: a few real images [b,3,S,S] to trace and to check the copy on. Returns ``rec``
    itself when the copy's ``encode`` differs by more than ``rtol`` (relative to the
    feature scale), so an unexpected architecture can never silently change the attack.
    """
    fast = copy.deepcopy(rec)
    for m in _modules(fast):
        m.eval().requires_grad_(False)
    with torch.no_grad():
        ref = rec.encode(example).float()
        if fold:
            fold_batchnorm(_modules(fast), lambda: fast.encode(example))
        streamline(_modules(fast))
        if channels_last:
            for m in _modules(fast):
                m.to(memory_format=torch.channels_last)
        got = fast.encode(example.contiguous(memory_format=torch.channels_last) if channels_last else example).float()
    if not torch.allclose(got, ref, rtol=rtol, atol=rtol * float(ref.abs().mean().clamp_min(1e-6))):
        return rec
    return fast


def folded_copy(model: nn.Module, run, inplace_relu6: bool = False, rtol: float = 1e-3,
                strided: bool = False) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of ``model`` with BN folded and "same" paddings streamlined
    (``strided``: see ``streamline``), checked on ``run(m) -> Tensor`` (a forward of ``m`` on a probe batch); returns
    (copy, number of rewrites), or (``model``, 0) when nothing was rewritten or the outputs
    differ by more than ``rtol`` relative to their scale. The caller sets the memory format."""
    with torch.no_grad():
        ref = run(model).float()
        cand = copy.deepcopy(model).eval()
        n = fold_batchnorm([cand], lambda: run(cand))
        n += streamline([cand], inplace_relu6=inplace_relu6, strided=strided)
        got = run(cand).float()
    if n and torch.allclose(got, ref, rtol=rtol, atol=rtol * float(ref.abs().mean().clamp_min(1e-6))):
        return cand, n
    return model, 0
