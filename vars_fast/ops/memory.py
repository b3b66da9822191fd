"""An opt-in caching CPU allocator for large blocks: ``cpu_block_cache``.

On a GPU, PyTorch's caching allocator hands a loop the same warm memory every iteration. On
the CPU each tensor goes to malloc, and glibc serves blocks above its mmap threshold (at most
32 MiB) with a fresh mapping every time, so a loop that makes a 38.5 MB tensor per step pays
~9,400 first-touch page faults (the kernel zeroes each 4 KiB page) on every call, which can
cost more than the arithmetic of a resize or an elementwise op on that tensor (the
``random_resize_pad`` and ``random_resize_pad [malloc]`` tables of
``benchmarks/results/cpu-intel-r-xeon-r-processor-2-50ghz-2-threads-rrp.md`` are the same
calls with and without the cache). jemalloc / tcmalloc (``LD_PRELOAD``, as PyTorch's CPU launcher
``torch.backends.xeon.run_cpu`` does) avoid it by keeping freed memory; ``cpu_block_cache``
does the same without a preload::

    with vars_fast.ops.cpu_block_cache():
        for batch in loader:
            ...                     # large CPU tensors are recycled across iterations

While it is on it is c10's CPU allocator for the whole process: every CPU tensor of at least
``min_bytes`` (ATen ops, the vars_fast kernels, your code) comes from per-size-class free
lists (64 KiB classes below 4 MiB, 2 MiB classes above; fresh blocks are 2 MiB-aligned
``MADV_HUGEPAGE`` mappings on Linux), smaller ones from the allocator it replaced. At most
``max_cached_bytes`` of freed blocks are kept; the rest is unmapped. Leaving the outermost
``with`` restores the previous allocator and unmaps the free blocks (tensors still alive keep
their memory until they die). Recycled memory is not zeroed: like malloc's.

It needs the compiled extension (``vars_fast._C``). The benchmark suite runs the
``random_resize_pad`` rows inside it for every provider, so the eager loop, ``grid_sample``,
``torch.compile`` and the kernel all get warm memory (``benchmarks/test_bench_random_resize_pad.py``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from vars_fast import _ext

_lock = threading.Lock()
_depth = 0

STAT_KEYS = ("active", "hits", "misses", "cached_bytes", "in_use_bytes", "min_bytes", "max_cached_bytes")


def _ops():
    if not cpu_block_cache_available():
        raise RuntimeError("vars_fast.ops.cpu_block_cache needs the compiled extension vars_fast._C "
                           f"({_ext.load_error() or 'built without the block cache'}); rebuild with "
                           "`pip install --no-build-isolation -e .`")
    return torch.ops.vars_fast


def cpu_block_cache_available() -> bool:
    return _ext.has_ops() and hasattr(torch.ops.vars_fast, "_block_cache_enable")


@contextlib.contextmanager
def cpu_block_cache(min_bytes: int = 1 << 20, max_cached_bytes: int = 1 << 30) -> Iterator[None]:
    """Recycle CPU blocks of >= ``min_bytes`` inside the ``with`` (module docstring).

    Nested uses share the outermost one's cache (their arguments are ignored); the outermost
    exit turns it off. Raises RuntimeError without the extension, ValueError on bad sizes.
    """
    global _depth
    if int(min_bytes) < 1 or int(max_cached_bytes) < 0:
        raise ValueError(f"cpu_block_cache: need min_bytes >= 1 and max_cached_bytes >= 0, got "
                         f"{min_bytes} and {max_cached_bytes}")
    ops = _ops()
    with _lock:
        if _depth == 0:
            ops._block_cache_enable(int(min_bytes), int(max_cached_bytes))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                ops._block_cache_disable()


def cpu_block_cache_stats() -> dict:
    """{active, hits, misses, cached_bytes, in_use_bytes, min_bytes, max_cached_bytes}."""
    return dict(zip(STAT_KEYS, (int(v) for v in _ops()._block_cache_stats())))


def cpu_block_cache_empty() -> None:
    """Unmap the cached free blocks now (the cache stays on)."""
    _ops()._block_cache_empty()
