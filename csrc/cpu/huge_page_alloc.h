// Large CPU outputs on transparent huge pages.
//
// A kernel that writes a fresh multi-MB output spends much of its time in first-touch page
// faults: glibc serves large requests with a fresh mmap, the kernel then faults it in 4 KiB at a
// time (one fault, one zeroed page per 4 KiB). Where transparent huge pages are in "madvise"
// mode, a 2 MiB-aligned anonymous mapping with madvise(MADV_HUGEPAGE) faults in 2 MiB at a time
// instead (512x fewer faults, the zeroing done in big contiguous clears).
//
// empty_cpu_large() returns an ordinary, resizable CPU tensor whose storage comes from
// HugePageCPUAllocator: requests >= kMinBytes (32 MiB) on Linux get such a mapping (released
// with munmap), everything else (and any mmap failure) goes to c10's default CPU allocator. A fresh
// anonymous mapping is zero-filled by the kernel, so *zeroed tells the caller it may skip
// writing zeros. Allocations are reported to the profiler like c10's own CPU allocations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "block_cache.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vars_fast {

namespace detail {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
constexpr size_t kHugePage = size_t(2) << 20;

// A 2 MiB-aligned anonymous mapping of n bytes (rounded up to whole 4 KiB pages; the part past
// the last 2 MiB boundary stays on small pages rather than growing the mapping), or nullptr.
// *len receives the mapped length (what unmap_huge needs).
inline void* map_huge(size_t n, size_t* len_out) {
  const size_t len = (n + 4095) & ~size_t(4095);
  const size_t span = len + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t b = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t a = (b + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  if (a > b) munmap(raw, a - b);
  if (b + span > a + len) munmap(reinterpret_cast<void*>(a + len), b + span - (a + len));
  void* p = reinterpret_cast<void*>(a);
  madvise(p, len, MADV_HUGEPAGE);  // advisory: on failure the mapping still works on small pages
  *len_out = len;
  return p;
}

inline void unmap_huge(void* p, size_t len) { munmap(p, len); }
#endif
}  // namespace detail

class HugePageCPUAllocator final : public c10::Allocator {
 public:
  // glibc serves requests above 32 MiB (its largest dynamic mmap threshold on 64-bit) with a
  // fresh mmap every time, which faults in every 4 KiB page on first touch; a huge-page mapping
  // faults 512x fewer times. Smaller requests glibc soon recycles from its heap, already faulted
  // in, and no fresh mapping beats that, so they stay with the default allocator.
  static constexpr size_t kMinBytes = size_t(32) << 20;

  c10::DataPtr allocate(size_t n) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kMinBytes) {
      if (void* p = map(n)) {
        c10::profiledCPUMemoryReporter().New(p, n);
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // True when the DataPtr is a fresh mapping from this allocator (zero-filled until written).
  static bool is_mapped(const c10::DataPtr& p) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    return p.get_deleter() == &release;
#else
    (void)p;
    return false;
#endif
  }

  static HugePageCPUAllocator* get() {
    static auto* a = new HugePageCPUAllocator();  // never destroyed: tensors may outlive static teardown
    return a;
  }

 private:
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static std::mutex& mu() {
    static auto* m = new std::mutex();
    return *m;
  }
  static std::unordered_map<void*, size_t>& lengths() {
    static auto* t = new std::unordered_map<void*, size_t>();
    return *t;
  }

  static void* map(size_t n) {
    size_t len = 0;
    void* p = detail::map_huge(n, &len);
    if (p == nullptr) return nullptr;
    std::lock_guard<std::mutex> g(mu());
    lengths()[p] = len;
    return p;
  }

  static void release(void* p) {
    size_t len = 0;
    {
      std::lock_guard<std::mutex> g(mu());
      auto it = lengths().find(p);
      if (it == lengths().end()) return;  // not ours: cannot happen (only this allocator installs release)
      len = it->second;
      lengths().erase(it);
    }
    c10::profiledCPUMemoryReporter().Delete(p);
    detail::unmap_huge(p, len);
  }
#endif
};

// An uninitialised contiguous CPU tensor (any dtype), on huge pages when large. *zeroed is set to
// true when its memory is known to read as zeros (a fresh mapping), false otherwise.
// While the block cache is on (block_cache.h) the tensor comes from c10's CPU allocator, which is
// then the cache (recycled, already faulted-in memory; *zeroed = false).
inline at::Tensor empty_cpu_large(at::IntArrayRef sizes, at::ScalarType dtype, bool* zeroed) {
  if (block_cache_active()) {
    *zeroed = false;
    return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  at::Tensor t(at::detail::empty_generic(sizes, HugePageCPUAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                         dtype, c10::nullopt));
  *zeroed = HugePageCPUAllocator::is_mapped(t.storage().data_ptr());
  return t;
}

}  // namespace vars_fast
