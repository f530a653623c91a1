// Per-tensor norms for the diagnostics Monitor (norm_stats.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace resnorm {

// ||t|| of every tensor (contiguous float32), as a float64 tensor.
at::Tensor norms(const std::vector<at::Tensor>& tensors);

// (2, count) float64: ||s_i - p_i|| (NaN without a previous snapshot) and ||s_i|| of each
// sample against its segment of `snapshot`, which is then overwritten with the samples.
at::Tensor update_norms(const std::vector<at::Tensor>& samples, at::Tensor snapshot,
                        bool have_previous);

}  // namespace resnorm
