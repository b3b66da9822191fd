"""random_resize_pad rows: 64 x 3 x 224 x 224 fp32 -> 64 x 3 x 224 x 224, sizes in [200, 223],
bilinear, forward only (the defence's purification path), fixed draws for every provider.

Baselines: ``eager`` = the per-sample F.interpolate + pad loop (the spec), ``eager_grid`` =
the batched grid_sample formulation, ``compile`` = torch.compile of the grid_sample
formulation (the loop has data-dependent shapes, so compiling it would recompile per size).
bytes = input read + output write.

Memory. Every provider makes a fresh 38.5 MB output per call. With glibc's malloc that is a
fresh mapping every time (above its 32 MiB mmap threshold), and its first-touch page faults
cost this 2-core VM 10-20 ms, more than the kernel's arithmetic, and the VM's fault rate
swings from run to run. A GPU run never sees this (PyTorch's CUDA caching allocator), and a CPU
run under jemalloc/tcmalloc would mostly not (not measured here). So the headline rows (op ``random_resize_pad``) run every
provider, baselines included, inside ``vars_fast.ops.cpu_block_cache``, where large blocks are
recycled: the same warm memory for all, the work of each formulation compared. The op
``random_resize_pad [malloc]`` repeats them with the process's plain allocator, where the kernel
takes fresh huge-page mappings (csrc/cpu/huge_page_alloc.h) and the baselines fresh 4 KiB pages.

This VM's speed drifts by tens of percent between the providers' rounds, and the Python loop
swings most, so ``test_random_resize_pad_paired`` also times a baseline and the kernel back to
back (alternating which goes first), 15 pairs each, under the block cache; it records the
min / median / max of the per-pair speed-ups (op ``random_resize_pad-paired``).

``test_random_resize_pad_fwd_bwd`` (op ``random_resize_pad fwd+bwd``, block cache on CPU) times
the forward and the gradient w.r.t. x for a fixed upstream gradient: the path of an adaptive
attacker who differentiates through the defence's random resize (EOT). The loop's backward
goes through one CopySlices node per sample, each of which clones the whole output gradient.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch

from vars_fast.ops.memory import cpu_block_cache, cpu_block_cache_available
from vars_fast.ops.random_resize_pad import (draw_resize_pad, random_resize_pad, random_resize_pad_grid_sample,
                                             random_resize_pad_reference)

B, C, S, MIN = 64, 3, 224, 200
PROVIDERS = ("eager", "eager_grid", "compile", "cpp", "triton", "cuda")
ALLOCATORS = ("block-cache", "malloc")


def _inputs(device, requires_grad: bool = False):
    """The fixed batch and draws every provider gets: x [B,C,S,S], sizes [B], offsets [B,2]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, C, S, S, generator=gen).to(device).requires_grad_(requires_grad)
    sizes, offsets = draw_resize_pad(B, S, MIN, gen, device)
    return x, sizes, offsets, gen


def _forward(provider: str, x, sizes, offsets):
    """The provider's forward as a no-argument callable."""
    if provider == "eager":
        return lambda: random_resize_pad_reference(x, sizes, offsets, S)
    if provider == "eager_grid":
        return lambda: random_resize_pad_grid_sample(x, sizes, offsets, S)
    if provider == "compile":
        f = torch.compile(random_resize_pad_grid_sample, dynamic=False)
        return lambda: f(x, sizes, offsets, S)
    backend = "triton" if provider == "triton" else "ext"
    return lambda: random_resize_pad(x, S, MIN, sizes=sizes, offsets=offsets, backend=backend)[0]


@pytest.mark.parametrize("alloc", ALLOCATORS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_random_resize_pad(bench, provider, alloc):
    bench.skip_unless(provider, "random_resize_pad")
    device = bench.device
    if alloc == "block-cache" and device != "cpu":
        pytest.skip("the block cache is a CPU allocator (CUDA memory is always cached)")
    if alloc == "block-cache" and not cpu_block_cache_available():
        pytest.skip("cpu_block_cache needs the compiled extension")
    x, sizes, offsets, _ = _inputs(device)
    fn = _forward(provider, x, sizes, offsets)
    if provider == "compile":
        fn()  # compile outside the timing
    with cpu_block_cache() if alloc == "block-cache" else contextlib.nullcontext():
        out = bench.run(fn, rounds=5)
        bench.record(op="random_resize_pad [malloc]" if alloc == "malloc" and device == "cpu" else "random_resize_pad",
                     shape=x.shape, provider=provider, bytes=2 * x.numel() * x.element_size(), flops=0, fn=fn,
                     mode="bilinear", min_size=MIN, allocator=alloc)
    assert out.shape == (B, C, S, S)


@pytest.mark.parametrize("baseline", ["eager", "eager_grid"])
def test_random_resize_pad_paired(bench, baseline):
    bench.skip_unless("cpp", "random_resize_pad")
    if not cpu_block_cache_available():
        pytest.skip("cpu_block_cache needs the compiled extension")
    x, sizes, offsets, _ = _inputs("cpu")
    b, k = _forward(baseline, x, sizes, offsets), _forward("cpp", x, sizes, offsets)
    speedups: list[float] = []

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def pair():
        if len(speedups) % 2 == 0:
            tb, tk = timed(b), timed(k)
        else:
            tk, tb = timed(k), timed(b)
        speedups.append(tb / tk)

    with cpu_block_cache():
        bench.run(pair, rounds=15)  # + 1 warm-up pair, left out below
    got = speedups[1:]
    bench.record(op="random_resize_pad-paired", shape=x.shape, provider=f"cpp vs {baseline}, pairs",
                 paired_speedup_median=statistics.median(got), paired_speedup_min=min(got),
                 paired_speedup_max=max(got))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_random_resize_pad_fwd_bwd(bench, provider):
    bench.skip_unless(provider, "random_resize_pad")
    device = bench.device
    use_cache = device == "cpu" and cpu_block_cache_available()
    x, sizes, offsets, gen = _inputs(device, requires_grad=True)
    grad_out = torch.randn(B, C, S, S, generator=gen).to(device)
    fwd = _forward(provider, x, sizes, offsets)

    def fn():
        (gx,) = torch.autograd.grad(fwd(), x, grad_out)
        return gx

    with cpu_block_cache() if use_cache else contextlib.nullcontext():
        fn()  # compile / first-use outside the timing
        out = bench.run(fn, rounds=5)
        bench.record(op="random_resize_pad fwd+bwd", shape=x.shape, provider=provider,
                     bytes=4 * x.numel() * x.element_size(), flops=0, fn=fn, mode="bilinear", min_size=MIN,
                     allocator="block-cache" if use_cache else "default")
    assert out.shape == x.shape
