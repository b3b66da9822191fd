"""pgd_step rows: B x 3 x 224 x 224 fp32, B in {1, 32}, the in-place update PGD uses.

bytes = 3 reads (x_adv, x_orig, grad) + 1 write (x_adv) per element. ``eager`` is the public op
on the reference backend (reference math + copy back), ``compile`` is torch.compile of the same
reference update (inductor fuses it into one in-place loop).
"""
from __future__ import annotations

import pytest
import torch

from vars_fast.ops.pgd_step import pgd_step, pgd_step_reference

ALPHA, EPS = 2 / 255, 8 / 255


def _compiled_reference():
    def update(x, x0, g):
        x.copy_(pgd_step_reference(x, x0, g, ALPHA, EPS))
    return torch.compile(update, dynamic=False)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "triton", "cuda"])
def test_pgd_step(bench, provider, batch):
    bench.skip_unless(provider, "pgd_step")
    device = bench.device
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 224, 224, generator=gen).to(device)
    x = x0.clone()
    g = torch.randn(x.shape, generator=gen).to(device)
    if provider == "compile":
        f = _compiled_reference()
        fn = lambda: f(x, x0, g)  # noqa: E731
        fn()  # compile outside the timed rounds
    else:
        backend = {"eager": "reference", "cpp": "ext", "cuda": "ext", "triton": "triton"}[provider]
        fn = lambda: pgd_step(x, x0, g, ALPHA, EPS, inplace=True, backend=backend)  # noqa: E731
    bench.run(fn, rounds=10 if batch == 1 else 5, iterations=10 if batch == 1 else 1)
    bench.record(op="pgd_step", shape=x.shape, provider=provider, bytes=4 * x.numel() * x.element_size(),
           flops=0, fn=fn, dtype="float32")
    assert ((x - x0).abs() <= EPS + 1e-6).all()
