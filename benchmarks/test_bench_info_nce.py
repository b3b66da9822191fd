"""info_nce rows: N = M in {4096, 16384}, d = 128, fp32, forward + backward (grads of anchors
and candidates), in-batch negatives (candidate_group = -1, positive_index = arange), tau = 0.1.

flops = the three N x M x d GEMMs the eager path needs (logits, dza, dzc): 6 N M d; the tiled
kernels recompute the logits once more in the backward (8 N M d done, 6 N M d counted).
bytes = inputs + outputs: (2 N d + 2 M d) * 4 (the point of the kernel: no N x M traffic).
peak_mem_mb: CUDA: torch.cuda.max_memory_allocated above the start. CPU: the profiler's peak
"Total Allocated" of torch's CPU allocator above the start (conftest.peak_mem_mb); the C++
kernel's own std::vector scratch (O(N + M) ints) is not seen, its tiles and per-thread [M, d]
accumulators are torch tensors and are counted.
"""
from __future__ import annotations

import pytest
import torch

from vars_fast.ops.info_nce import info_nce, info_nce_reference

D, TAU = 128, 0.1


# provider outermost: a shape's providers run back to back (the shared CPU's load drifts)
@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384])
def test_info_nce(bench, provider, n):
    bench.skip_unless(provider, "info_nce")
    device = bench.device
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, D, generator=gen).to(device).requires_grad_(True)
    c = torch.randn(n, D, generator=gen).to(device).requires_grad_(True)
    pos = torch.arange(n, device=device)
    ag = torch.zeros(n, dtype=torch.long, device=device)
    cg = torch.full((n,), -1, dtype=torch.long, device=device)

    if provider == "compile":
        f = torch.compile(lambda x, y: info_nce_reference(x, y, pos, ag, cg, TAU), dynamic=False)
    else:
        backend = {"eager": "reference", "cpp": "ext", "cuda": "ext", "triton": "triton"}[provider]
        f = lambda x, y: info_nce(x, y, pos, ag, cg, TAU, backend=backend)  # noqa: E731

    def fn():
        return torch.autograd.grad(f(a, c).sum(), (a, c))

    fn()  # compile / warm caches outside the timed rounds
    bench.run(fn, rounds=3 if n <= 4096 else 1)
    bench.record(op="info_nce", shape=f"N=M={n} d={D} fwd+bwd", provider=provider, bytes=4 * n * D * 4,
                 flops=6 * n * n * D, fn=fn, dtype="float32")
