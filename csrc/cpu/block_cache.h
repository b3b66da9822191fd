// An opt-in caching CPU allocator for large blocks (vars_fast.ops.cpu_block_cache).
//
// PyTorch caches GPU memory (the CUDA caching allocator) but on the CPU every tensor goes to
// malloc, and glibc serves requests above its mmap threshold (at most 32 MiB) with a fresh
// mapping each time: a loop that makes the same 38 MiB tensor every iteration pays a
// first-touch page fault, with the kernel zeroing each page, on every call. jemalloc and
// tcmalloc avoid that by keeping freed memory; this does the same inside the process, only for
// blocks >= min_bytes, and only while enabled.
//
// While enabled the block cache is c10's CPU allocator (c10::SetCPUAllocator), so it serves
// every CPU tensor allocation in the process (ATen ops, the vars_fast kernels, Python code
// alike). Requests below min_bytes go to the allocator it replaced. Larger ones are rounded up
// to a size class (64 KiB steps below 4 MiB, 2 MiB steps above), served from a free list of that
// class when one is there, else from a fresh 2 MiB-aligned MADV_HUGEPAGE mapping; freed blocks
// go back to their free list while the cached total stays <= max_cached_bytes, else they are
// unmapped. Disabling restores the previous allocator and unmaps the free lists; blocks still
// in use are unmapped when their tensors die. The profiler sees a block as allocated while a
// tensor holds it (like the CUDA allocator's "allocated", not "reserved").
#pragma once

#include <cstdint>
#include <vector>

namespace vars_fast {

// True while the block cache is installed as c10's CPU allocator.
bool block_cache_active();

// Install (or re-parameterise) the cache. Raises if another allocator of higher priority is
// installed and c10 kept it.
void block_cache_enable(int64_t min_bytes, int64_t max_cached_bytes);

// Restore the allocator that was replaced and unmap the cached free blocks (no-op when off).
void block_cache_disable();

// Unmap the cached free blocks, keep the cache installed.
void block_cache_empty();

// [active, hits, misses, cached_bytes, in_use_bytes, min_bytes, max_cached_bytes]
std::vector<int64_t> block_cache_stats();

}  // namespace vars_fast
