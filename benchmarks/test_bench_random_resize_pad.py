"""random_resize_pad rows: 64 x 3 x 224 x 224 fp32 -> 64 x 3 x 224 x 224, sizes in [200, 223],
bilinear, forward only (the defence's purification path), fixed draws for every provider.

Baselines: ``eager`` = the per-sample F.interpolate + pad loop (the spec), ``eager_grid`` =
the batched grid_sample formulation, ``compile`` = torch.compile of the grid_sample
formulation (the loop has data-dependent shapes, so compiling it would recompile per size).
bytes = input read + output write.
"""
from __future__ import annotations

import pytest
import torch

from vars_fast.ops.random_resize_pad import (draw_resize_pad, random_resize_pad, random_resize_pad_grid_sample,
                                             random_resize_pad_reference)

B, C, S, MIN = 64, 3, 224, 200
PROVIDERS = ("eager", "eager_grid", "compile", "cpp", "triton", "cuda")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_random_resize_pad(bench, provider):
    bench.skip_unless(provider, "random_resize_pad")
    device = bench.device
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, C, S, S, generator=gen).to(device)
    sizes, offsets = draw_resize_pad(B, S, MIN, gen, device)
    if provider == "eager":
        fn = lambda: random_resize_pad_reference(x, sizes, offsets, S)  # noqa: E731
    elif provider == "eager_grid":
        fn = lambda: random_resize_pad_grid_sample(x, sizes, offsets, S)  # noqa: E731
    elif provider == "compile":
        f = torch.compile(random_resize_pad_grid_sample, dynamic=False)
        fn = lambda: f(x, sizes, offsets, S)  # noqa: E731
        fn()
    else:
        backend = "triton" if provider == "triton" else "ext"
        fn = lambda: random_resize_pad(x, S, MIN, sizes=sizes, offsets=offsets, backend=backend)[0]  # noqa: E731
    out = bench.run(fn, rounds=5)
    bench.record(op="random_resize_pad", shape=x.shape, provider=provider,
           bytes=2 * x.numel() * x.element_size(), flops=0, fn=fn, mode="bilinear",
           min_size=MIN)
    assert out.shape == (B, C, S, S)
