// Per-tensor norms for the diagnostics Monitor (norm_stats.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace resnorm {

// ||t|| of every tensor (contiguous float32), as a float64 tensor.
at::Tensor norms(const std::vector<at::Tensor>& tensors);

// (2, count) float64: ||s_i - p_i|| (NaN without a previous snapshot) and ||s_i|| of each
// sample against its segment of `snapshot`, which is then overwritten with the samples.
at::Tensor update_norms(const std::vector<at::Tensor>& samples, at::Tensor snapshot,
                        bool have_previous);

// The float64 sum over the batch axis (axis 0) of every unit of a contiguous float32
// tensor, shaped as x.shape[1:] ((1,) for a tensor of one axis or none: one unit), and the
// float64 sum of squares of all values: one pass over memory, no float64 copy.
std::tuple<at::Tensor, double> unit_moments(const at::Tensor& x);

}  // namespace resnorm
