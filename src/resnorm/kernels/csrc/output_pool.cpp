// The output pool: a caching allocator, in transparent huge pages, for the fused kernel's
// large outputs (see resnorm/kernels/cpu.py and docs/kernels.md).
#include "output_pool.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace resnorm {
namespace {

// A caching pool for large outputs. glibc serves every allocation of 32 MiB or more with
// fresh pages from the OS and unmaps them on free, so each call of a memory-bound op on
// large activations pays for faulting in and zeroing its outputs, one 4 KiB page at a
// time: more than the op's own pass over memory. Outputs from this pool are mapped in
// transparent huge pages (2 MiB faults instead of 4 KiB ones) and, when freed, kept for the
// next output of the same size, as PyTorch's CUDA caching allocator does. Free blocks are
// capped (`max_cached` bytes; beyond it a freed block goes back to the OS) and
// `empty_cache()` returns them all. The tensors are ordinary CPU tensors whose storage
// uses this allocator (so resize_ and the like work).
#if defined(__linux__)
constexpr size_t kGranule = size_t(2) << 20;  // block sizes are multiples of this

class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& instance() {
    static OutputPool* pool = [] {
      auto* created = new OutputPool();  // never destroyed: tensors may outlive exit
      // A fork (DataLoader workers, multiprocessing) while another thread holds the lock
      // would leave it locked forever in the child: take it around the fork.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return created;
    }();
    return *pool;
  }
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kGranule - 1) / kGranule * kGranule;
    void* data = take(bytes);
    if (data == nullptr) data = map(bytes);
    return {data, new Block{data, bytes}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }
  // Sets the cap on free bytes kept (0: keep none) and trims to it.
  void set_max_cached(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      max_cached_ = bytes;
    }
    trim_to(bytes);
  }
  // Returns every free block to the OS.
  void empty_cache() { trim_to(0); }
  std::map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {{"hits", hits_}, {"misses", misses_}, {"cached_bytes", int64_t(cached_)},
            {"cached_blocks", int64_t(free_.size())}, {"max_cached", int64_t(max_cached_)},
            {"released_blocks", released_}};
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  static void release(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    instance().give(*block);
  }
  void give(const Block& block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + block.bytes <= max_cached_) {
        free_.emplace(block.bytes, block.data);
        cached_ += block.bytes;
        return;
      }
      ++released_;
    }
    munmap(block.data, block.bytes);
  }
  // The most recently freed block of this size (last in: a block freed just now is the one
  // most likely still in cache; blocks of equal size are kept in the order they were freed).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.upper_bound(bytes);
    if (it == free_.begin() || std::prev(it)->first != bytes) {
      ++misses_;
      return nullptr;
    }
    it = std::prev(it);
    void* data = it->second;
    cached_ -= bytes;
    free_.erase(it);
    ++hits_;
    return data;
  }
  // Returns the largest free blocks to the OS until at most `keep` bytes stay cached.
  void trim_to(size_t keep) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (cached_ > keep) {
        auto it = std::prev(free_.end());
        drop.push_back({it->second, it->first});
        cached_ -= it->first;
        ++released_;
        free_.erase(it);
      }
    }
    for (const Block& b : drop) munmap(b.data, b.bytes);  // outside the lock
  }
  static void* map(size_t bytes) {
    // Over-map by one granule and trim, so that the block starts on a huge-page boundary.
    const size_t span = bytes + kGranule;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "resnorm: out of memory allocating ", bytes, " bytes");
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t start = (base + kGranule - 1) / kGranule * kGranule;
    const size_t head = start - base, tail = span - head - bytes;
    if (head) munmap(raw, head);
    if (tail) munmap(reinterpret_cast<void*>(start + bytes), tail);
#if defined(MADV_HUGEPAGE)
    (void)madvise(reinterpret_cast<void*>(start), bytes, MADV_HUGEPAGE);  // best effort
#endif
    return reinterpret_cast<void*>(start);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, max_cached_ = 0;
  int64_t hits_ = 0, misses_ = 0, released_ = 0;
};
#endif

std::atomic<int64_t> g_pool_min_bytes{-1};  // outputs of at least this size are pooled; < 0: off
}  // namespace

// An uninitialized (rows, n) output of `dtype`: from the output pool when it is enabled
// and the output is at least g_pool_min_bytes, else from PyTorch's allocator.
at::Tensor empty_output(int64_t rows, int64_t n, at::ScalarType dtype) {
#if defined(__linux__)
  const int64_t bytes = rows * n * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t min_bytes = g_pool_min_bytes.load();
  if (min_bytes >= 0 && bytes >= min_bytes) {
    return at::detail::empty_generic({rows, n}, &OutputPool::instance(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     c10::nullopt);
  }
#endif
  return at::empty({rows, n}, at::TensorOptions().dtype(dtype));
}

// min_bytes < 0 disables the pool for new outputs; max_cached caps the free bytes kept.
void configure_pool(int64_t min_bytes, int64_t max_cached) {
  g_pool_min_bytes = min_bytes;
#if defined(__linux__)
  OutputPool::instance().set_max_cached(static_cast<size_t>(std::max<int64_t>(max_cached, 0)));
#endif
}

std::map<std::string, int64_t> pool_stats() {
#if defined(__linux__)
  auto stats = OutputPool::instance().stats();
#else
  std::map<std::string, int64_t> stats;
#endif
  stats["min_bytes"] = g_pool_min_bytes.load();
  return stats;
}

void pool_empty_cache() {
#if defined(__linux__)
  OutputPool::instance().empty_cache();
#endif
}

}  // namespace resnorm
