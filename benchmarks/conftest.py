"""Benchmark conventions (every ``benchmarks/test_bench_*.py`` follows them).

Run: ``make bench`` = ``pytest -q benchmarks --benchmark-json=benchmarks/results/cpu.json`` then
``python benchmarks/report.py benchmarks/results/cpu.json`` (ratio tables, saved under
``benchmarks/results/<device>.md`` + ``.json``).

1. One test per (op, shape), parametrized by ``provider``:
   * op rows: ``eager`` (the pure-torch reference, the baseline) | ``compile`` (torch.compile of
     a baseline, fixed shapes, compiled outside the timed rounds) | ``cpp`` (the compiled
     extension on CPU) | ``triton`` | ``cuda`` (the extension's CUDA kernel). Extra baselines are
     named ``eager_<what>`` (e.g. ``eager_grid`` = batched grid_sample for random_resize_pad).
   * end-to-end rows (attack, denoiser step, screening): ``eager`` (the naive loop) plus the
     package's own variants (``package``, ``package-compile``, ...).
   A provider that cannot run here is skipped (``skip_unless_available``), never faked.
2. Tests use the ``bench`` fixture (a :class:`Bench`: ``bench.device``, ``bench.skip_unless(provider,
   op)``, ``bench.run(fn, rounds=...)``, ``bench.record(...)``); conftest is not imported as a
   module. Every test records ``benchmark.extra_info`` through ``bench.record``:
   ``{op, shape, provider, bytes, flops, peak_mem_mb, device}`` -- ``bytes`` = bytes moved per
   call (reads + writes of the ideal kernel, for GB/s), ``flops`` per call (0 if memory-bound);
   end-to-end rows add their throughput (e.g. ``items_per_s``) and may leave bytes/flops at 0.
3. Time with ``benchmark.pedantic(fn, rounds=..., warmup_rounds=1)`` and few rounds: the whole
   suite must stay within a few minutes on 2 shared cores. Tests never assert timings.
4. The bench device is CUDA when available (``VARS_FAST_BENCH_DEVICE`` overrides: cpu|cuda);
   ``cpp`` runs only on a CPU run, ``triton``/``cuda`` only on a CUDA run, so every ratio in one
   table compares one device.
5. Machine peaks (copy bandwidth, fp32 matmul GFLOP/s) and versions are measured once per run in
   ``pytest_benchmark_update_machine_info`` and land in the JSON's ``machine_info["vars_fast"]``;
   report.py expresses achieved GB/s and GFLOP/s as a share of them.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Sequence

import pytest
import torch

from vars_fast.utils import cpu_model

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

OP_PROVIDERS = ("eager", "compile", "cpp", "triton", "cuda")


def bench_device() -> str:
    dev = os.environ.get("VARS_FAST_BENCH_DEVICE")
    if dev:
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"VARS_FAST_BENCH_DEVICE={dev!r}: expected 'cpu' or 'cuda'")
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | None = None) -> str:
    device = device or bench_device()
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def skip_unless_available(provider: str, op: str, device: str | None = None) -> None:
    """pytest.skip with the reason when ``provider`` cannot run ``op`` on the bench device."""
    from vars_fast.ops import _dispatch
    device = device or bench_device()
    if provider == "cpp" and device != "cpu":
        pytest.skip("cpp runs on CPU runs only (VARS_FAST_BENCH_DEVICE=cpu)")
    if provider in ("triton", "cuda") and device != "cuda":
        pytest.skip(f"{provider} needs a CUDA bench device")
    if provider in ("cpp", "cuda", "triton"):
        backend = "triton" if provider == "triton" else "ext"
        why = _dispatch.reasons(op, [torch.empty(0, device=device)])[backend]
        if why:
            pytest.skip(f"{provider}: {why}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mem_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated above the starting point while running ``fn`` once (MB).

    CUDA: the caching allocator's peak. CPU: the largest "Total Allocated" seen by the profiler's
    memory events (torch's CPU allocator; scratch inside a C++ kernel's std::vector is not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name)).get("traceEvents", [])
    totals = [(e["ts"], e["args"].get("Total Allocated", 0), e["args"].get("Bytes", 0))
              for e in events if e.get("name") == "[memory]" and "args" in e]
    if not totals:
        return 0.0
    totals.sort()
    base = totals[0][1] - totals[0][2]  # allocated before the first event
    return max(0.0, (max(t for _, t, _ in totals) - base) / 2**20)


def record(benchmark, *, op: str, shape: Sequence[int] | str, provider: str, bytes: int = 0, flops: int = 0,
           fn: Callable[[], object] | None = None, device: str | None = None, **extra) -> None:
    """Fill ``benchmark.extra_info`` per the convention (measures peak memory with ``fn``)."""
    device = device or bench_device()
    info = dict(op=op, shape=shape if isinstance(shape, str) else "x".join(map(str, shape)), provider=provider,
                bytes=int(bytes), flops=int(flops), device=device,
                peak_mem_mb=round(peak_mem_mb(fn, device), 2) if fn is not None else None)
    info.update(extra)
    benchmark.extra_info.update(info)


def run_timed(benchmark, fn: Callable[[], object], device: str | None = None, rounds: int = 5, iterations: int = 1):
    """benchmark.pedantic with a CUDA sync inside the timed call, one warm-up round."""
    device = device or bench_device()

    def call():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)


class Bench:
    """Per-test helper handed out by the ``bench`` fixture (wraps pytest-benchmark's fixture)."""

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.device = bench_device()

    def skip_unless(self, provider: str, op: str) -> None:
        skip_unless_available(provider, op, self.device)

    def run(self, fn: Callable[[], object], rounds: int = 5, iterations: int = 1):
        return run_timed(self.benchmark, fn, self.device, rounds, iterations)

    def record(self, **kw) -> None:
        kw.setdefault("device", self.device)
        record(self.benchmark, **kw)


@pytest.fixture
def bench(benchmark) -> Bench:
    return Bench(benchmark)


# ---- machine peaks, measured once per run ------------------------------------------------
def measure_copy_gbps(device: str, mb: int = 256, reps: int = 5) -> float:
    """Best-of-``reps`` ``dst.copy_(src)`` bandwidth, counting read + write (GB/s)."""
    n = mb * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def measure_matmul_gflops(device: str, reps: int = 3) -> float:
    """Best-of-``reps`` fp32 square matmul throughput (GFLOP/s); TF32 off so it is true fp32."""
    n = 4096 if device == "cuda" else 1024
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b
        best = float("inf")
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n ** 3 / best / 1e9


def pytest_benchmark_update_machine_info(config, machine_info):
    device = bench_device()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from vars_fast import _ext
    machine_info["vars_fast"] = dict(
        device=device, device_name=device_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, ext_loaded=_ext.has_ops(),
        copy_gbps=round(measure_copy_gbps(device), 2), matmul_gflops=round(measure_matmul_gflops(device), 1),
    )
