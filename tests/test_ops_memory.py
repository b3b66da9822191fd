"""vars_fast.ops.cpu_block_cache: the opt-in caching CPU allocator for large blocks.

What it must do: recycle freed blocks of >= min_bytes (same address back for the same size
class), leave small ones to the previous allocator, keep at most max_cached_bytes, restore the
previous allocator on exit (nested uses share the outermost), and never change a result: the
kernels that skip writing zeros on fresh mappings must write them into recycled memory.
"""
from __future__ import annotations

import threading

import pytest
import torch

from vars_fast import _ext
from vars_fast.ops import memory
from vars_fast.ops.memory import cpu_block_cache, cpu_block_cache_available, cpu_block_cache_stats
from vars_fast.ops.random_resize_pad import draw_resize_pad, random_resize_pad, random_resize_pad_reference

needs_cache = pytest.mark.skipif(not cpu_block_cache_available(), reason="compiled extension without the block cache")
MB = 1 << 20


@needs_cache
def test_large_blocks_are_recycled_small_ones_are_not():
    with cpu_block_cache(min_bytes=MB):
        before = cpu_block_cache_stats()
        assert before["active"] == 1
        a = torch.empty(3 * MB // 4 + 5, dtype=torch.float32)  # 3 MB: a large block
        pa = a.data_ptr()
        del a
        b = torch.empty(3 * MB // 4 + 5, dtype=torch.float32)  # same size class: the same block
        assert b.data_ptr() == pa
        s = cpu_block_cache_stats()
        assert s["hits"] - before["hits"] == 1 and s["misses"] - before["misses"] == 1
        assert s["in_use_bytes"] >= b.numel() * 4
        small = torch.empty(1000)  # below min_bytes: the previous allocator, not counted
        assert cpu_block_cache_stats()["misses"] == s["misses"]
        del small, b
    s = cpu_block_cache_stats()
    assert s["active"] == 0 and s["cached_bytes"] == 0


@needs_cache
def test_max_cached_bytes_bounds_the_free_lists():
    with cpu_block_cache(min_bytes=MB, max_cached_bytes=5 * MB):
        ts = [torch.empty(4 * MB // 4) for _ in range(3)]  # three 4 MiB blocks
        del ts
        assert 0 < cpu_block_cache_stats()["cached_bytes"] <= 5 * MB
        memory.cpu_block_cache_empty()  # unmaps the free blocks, stays on
        assert cpu_block_cache_stats()["cached_bytes"] == 0 and cpu_block_cache_stats()["active"] == 1
    with cpu_block_cache(min_bytes=MB, max_cached_bytes=0):  # nothing kept: every block is fresh
        t = torch.empty(2 * MB // 4)
        del t
        assert cpu_block_cache_stats()["cached_bytes"] == 0
        hits = cpu_block_cache_stats()["hits"]
        u = torch.empty(2 * MB // 4)
        del u
        assert cpu_block_cache_stats()["hits"] == hits


@needs_cache
def test_nested_uses_share_the_outer_cache_and_exit_restores():
    with cpu_block_cache(min_bytes=MB):
        with cpu_block_cache(min_bytes=8 * MB):  # arguments of an inner use are ignored
            assert cpu_block_cache_stats()["min_bytes"] == MB
        assert cpu_block_cache_stats()["active"] == 1  # still on after the inner exit
        keep = torch.full((MB,), 7.0)  # 4 MB, alive past the exit
    assert cpu_block_cache_stats()["active"] == 0
    assert float(keep.sum()) == 7.0 * MB  # memory of a block outlives the cache being on
    del keep  # unmapped now (the cache is off): must not crash or leak into a later cache
    with cpu_block_cache(min_bytes=MB):
        assert cpu_block_cache_stats()["cached_bytes"] == 0


@needs_cache
def test_exception_inside_turns_it_off():
    with pytest.raises(ValueError, match="boom"):
        with cpu_block_cache():
            raise ValueError("boom")
    assert cpu_block_cache_stats()["active"] == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="min_bytes"):
        with cpu_block_cache(min_bytes=0):
            pass


def test_without_the_extension_it_says_so(monkeypatch):
    monkeypatch.setattr(_ext, "has_ops", lambda: False)
    monkeypatch.setattr(_ext, "load_error", lambda: "disabled by VARS_FAST_NO_EXT=1")
    assert not memory.cpu_block_cache_available()
    with pytest.raises(RuntimeError, match="needs the compiled extension"):
        with cpu_block_cache():
            pass


@needs_cache
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_kernel_writes_the_padding_into_recycled_memory(mode):
    # Outputs >= 32 MiB skip writing zeros on fresh (zero) mappings; recycled blocks hold
    # whatever was there before, so under the cache the padding must be written.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 424, 416, generator=g)
    sizes, offsets = draw_resize_pad(16, 448, 100, g)
    want = random_resize_pad_reference(x, sizes, offsets, 448, mode)
    n = want.numel()
    with cpu_block_cache():
        for _ in range(3):
            junk = torch.full((n,), float("nan"))  # the block the output will get next
            del junk
            got = random_resize_pad(x, 448, 100, mode=mode, sizes=sizes, offsets=offsets, backend="ext")[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert cpu_block_cache_stats()["hits"] > 0
            (gx,) = torch.autograd.grad(random_resize_pad(x.requires_grad_(), 448, 100, mode=mode, sizes=sizes,
                                                          offsets=offsets, backend="ext")[0], x, torch.ones_like(want))
            (gr,) = torch.autograd.grad(random_resize_pad_reference(x, sizes, offsets, 448, mode), x,
                                        torch.ones_like(want))
            x = x.detach()
            torch.testing.assert_close(gx, gr, atol=1e-4, rtol=1e-4)


@needs_cache
def test_threads_allocating_and_freeing_concurrently():
    errors = []

    def work(seed):
        try:
            for i in range(50):
                t = torch.full((MB // 2 + 1000 * (i % 3),), float(seed))  # ~2 MB, 3 size classes
                if float(t[-1]) != float(seed):
                    errors.append(f"thread {seed}: wrong value")
                del t
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    with cpu_block_cache(min_bytes=MB):
        s0 = cpu_block_cache_stats()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = cpu_block_cache_stats()
    assert not errors
    assert s["in_use_bytes"] == 0
    assert (s["hits"] - s0["hits"]) + (s["misses"] - s0["misses"]) == 200  # every block went through it
