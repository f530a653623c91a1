// The output pool (output_pool.cpp): large outputs of the fused kernel come from a caching
// allocator in transparent huge pages instead of PyTorch's (glibc's) allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <string>

namespace resnorm {

// An uninitialized (rows, n) output of `dtype`: from the pool when it is enabled and the
// output is large enough, else from PyTorch's allocator.
at::Tensor empty_output(int64_t rows, int64_t n, at::ScalarType dtype);

// min_bytes < 0 disables the pool for new outputs; max_cached caps the free bytes kept.
void configure_pool(int64_t min_bytes, int64_t max_cached);

// hits, misses, cached_bytes, cached_blocks, max_cached, released_blocks, min_bytes.
std::map<std::string, int64_t> pool_stats();

// Returns the pool's free blocks to the OS.
void pool_empty_cache();

}  // namespace resnorm
