// The opt-in caching CPU allocator for large blocks: see block_cache.h.
#include "block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "huge_page_alloc.h"

namespace vars_fast {
namespace {

constexpr size_t kSmallStep = size_t(64) << 10;  // 64 KiB classes below 4 MiB
constexpr size_t kLargeStep = size_t(2) << 20;   // 2 MiB classes from 4 MiB up
constexpr size_t kLargeFrom = size_t(4) << 20;

size_t size_class(size_t n) {
  const size_t step = n >= kLargeFrom ? kLargeStep : kSmallStep;
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    c10::Allocator* under = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (n >= min_bytes_ && on_) {
        const size_t cls = size_class(n);
        void* p = nullptr;
        auto it = free_.find(cls);
        if (it != free_.end() && !it->second.empty()) {
          p = it->second.back();
          it->second.pop_back();
          cached_ -= cls;
          ++hits_;
        } else {
          p = map_block(cls);
          ++misses_;
        }
        if (p != nullptr) {
          live_[p] = cls;
          in_use_ += cls;
          c10::profiledCPUMemoryReporter().New(p, cls);
          return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
        }
      }
      under = prev_ != nullptr ? prev_ : c10::GetDefaultCPUAllocator();
    }
    return under->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static BlockCache& get() {
    static auto* c = new BlockCache();  // never destroyed: tensors may outlive static teardown
    return *c;
  }

  bool active() {
    std::lock_guard<std::mutex> g(mu_);
    return on_;
  }

  void enable(size_t min_bytes, size_t max_cached) {
    std::unique_lock<std::mutex> g(mu_);
    min_bytes_ = min_bytes;
    max_cached_ = max_cached;
    trim_locked(max_cached_);
    if (on_) return;
    prev_ = c10::GetCPUAllocator();
    on_ = true;
    g.unlock();
    c10::SetCPUAllocator(this, /*priority=*/0);
    if (c10::GetCPUAllocator() != this) {  // c10 keeps an allocator set with a higher priority
      g.lock();
      on_ = false;
      prev_ = nullptr;
      TORCH_CHECK(false, "vars_fast: cpu_block_cache cannot be enabled: another CPU allocator was installed "
                         "with a higher priority (c10::SetCPUAllocator)");
    }
  }

  void disable() {
    std::unique_lock<std::mutex> g(mu_);
    if (!on_) return;
    c10::Allocator* prev = prev_;
    on_ = false;
    trim_locked(0);
    g.unlock();
    if (c10::GetCPUAllocator() == this) c10::SetCPUAllocator(prev, /*priority=*/0);
  }

  void empty() {
    std::lock_guard<std::mutex> g(mu_);
    trim_locked(0);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {on_ ? 1 : 0, int64_t(hits_), int64_t(misses_), int64_t(cached_), int64_t(in_use_), int64_t(min_bytes_),
            int64_t(max_cached_)};
  }

 private:
  BlockCache() = default;

  static void* map_block(size_t cls) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    size_t len = 0;  // == cls: classes are multiples of 64 KiB, so whole pages
    return detail::map_huge(cls, &len);
#else
    return std::aligned_alloc(64, cls);  // cls is a multiple of 64
#endif
  }

  static void unmap_block(void* p, size_t cls) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    detail::unmap_huge(p, cls);
#else
    (void)cls;
    std::free(p);
#endif
  }

  static void release(void* p) {
    BlockCache& c = get();
    std::lock_guard<std::mutex> g(c.mu_);
    auto it = c.live_.find(p);
    if (it == c.live_.end()) return;  // cannot happen: only this allocator installs release
    const size_t cls = it->second;
    c.live_.erase(it);
    c.in_use_ -= cls;
    c10::profiledCPUMemoryReporter().Delete(p);
    if (c.on_ && c.cached_ + cls <= c.max_cached_) {
      c.free_[cls].push_back(p);
      c.cached_ += cls;
    } else {
      unmap_block(p, cls);
    }
  }

  // Unmap free blocks until at most `keep` bytes stay cached.
  void trim_locked(size_t keep) {
    for (auto it = free_.begin(); it != free_.end() && cached_ > keep;) {
      auto& v = it->second;
      while (!v.empty() && cached_ > keep) {
        unmap_block(v.back(), it->first);
        v.pop_back();
        cached_ -= it->first;
      }
      it = v.empty() ? free_.erase(it) : std::next(it);
    }
  }

  std::mutex mu_;
  bool on_ = false;
  c10::Allocator* prev_ = nullptr;
  size_t min_bytes_ = size_t(1) << 20;
  size_t max_cached_ = size_t(1) << 30;
  size_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size class -> free blocks
  std::unordered_map<void*, size_t> live_;                // block -> size class
};

}  // namespace

bool block_cache_active() { return BlockCache::get().active(); }

void block_cache_enable(int64_t min_bytes, int64_t max_cached_bytes) {
  TORCH_CHECK(min_bytes >= 1, "vars_fast: cpu_block_cache min_bytes must be >= 1, got ", min_bytes);
  TORCH_CHECK(max_cached_bytes >= 0, "vars_fast: cpu_block_cache max_cached_bytes must be >= 0, got ",
              max_cached_bytes);
  BlockCache::get().enable(size_t(min_bytes), size_t(max_cached_bytes));
}

void block_cache_disable() { BlockCache::get().disable(); }

void block_cache_empty() { BlockCache::get().empty(); }

std::vector<int64_t> block_cache_stats() { return BlockCache::get().stats(); }

}  // namespace vars_fast
