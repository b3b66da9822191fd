"""residual_epilogue rows: 8 x 64 x 128 x 128 fp32, forward + backward (grads of y, weight,
bias, residual), instance norm, the denoiser's two uses: ``relu`` (norm + ReLU after conv1) and
``residual`` (norm + residual add after conv2), NCHW and channels_last.

bytes = the ideal fused kernel's traffic: forward reads y (+ residual) and writes out, backward
reads y and grad and writes dy: (2 + residual + 3) * numel * 4. ``eager`` is the reference
(F.instance_norm + relu + add under autograd), ``compile`` is torch.compile of the reference.
"""
from __future__ import annotations

import pytest
import torch

from vars_fast.ops.residual_epilogue import residual_epilogue, residual_epilogue_reference

SHAPE = (8, 64, 128, 128)
CASES = [("relu", "nchw"), ("residual", "nchw"), ("residual", "channels_last")]


# provider outermost: a shape's providers run back to back (the shared CPU's load drifts)
@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("case,layout", CASES)
def test_residual_epilogue(bench, provider, case, layout):
    bench.skip_unless(provider, "residual_epilogue")
    device = bench.device
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.randn(SHAPE, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(SHAPE[1], generator=gen)).to(device).requires_grad_(True)
    b = (0.1 * torch.randn(SHAPE[1], generator=gen)).to(device).requires_grad_(True)
    r = None
    if case == "residual":
        r = torch.randn(SHAPE, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_(True)
    act = "relu" if case == "relu" else "none"
    gout = torch.randn(SHAPE, generator=gen).to(device).contiguous(memory_format=fmt)
    inputs = [t for t in (y, w, b, r) if t is not None]

    if provider == "compile":
        f = torch.compile(lambda yy, ww, bb, rr: residual_epilogue_reference(yy, ww, bb, rr, "instance", act),
                          dynamic=False)
    else:
        backend = {"eager": "reference", "cpp": "ext", "cuda": "ext", "triton": "triton"}[provider]
        f = lambda yy, ww, bb, rr: residual_epilogue(yy, ww, bb, rr, "instance", act, backend=backend)  # noqa: E731

    def fn():
        return torch.autograd.grad(f(y, w, b, r), inputs, gout)

    fn()  # compile / warm caches outside the timed rounds
    bench.run(fn, rounds=5)
    numel = y.numel()
    bench.record(op="residual_epilogue", shape=f"{'x'.join(map(str, SHAPE))} {case} {layout} fwd+bwd",
                 provider=provider, bytes=(5 + (r is not None)) * numel * 4, flops=0, fn=fn, dtype="float32")
