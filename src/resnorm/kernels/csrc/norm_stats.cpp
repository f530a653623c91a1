// Per-tensor norms for the diagnostics Monitor: a whole model in one call instead of a
// dispatch per tensor. float32, contiguous; sums of squares in float64.
#include "norm_stats.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace resnorm {
namespace {

double sum_squares(const float* __restrict p, int64_t n) {
  constexpr int64_t lanes = 16;
  double acc[lanes] = {0.0};
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
#pragma omp simd
    for (int64_t k = 0; k < lanes; ++k) acc[k] += static_cast<double>(p[j + k]) * p[j + k];
  }
  double s = 0.0;
  for (; j < n; ++j) s += static_cast<double>(p[j]) * p[j];
  for (int64_t k = 0; k < lanes; ++k) s += acc[k];
  return s;
}

void check_float_contiguous(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "resnorm CPU kernel: tensor statistics need contiguous float32 CPU tensors");
}

}  // namespace

// ||t|| of every tensor, as a float64 tensor.
at::Tensor norms(const std::vector<at::Tensor>& tensors) {
  const int64_t count = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (const auto& t : tensors) check_float_contiguous(t);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      o[i] = std::sqrt(sum_squares(tensors[i].data_ptr<float>(), tensors[i].numel()));
  });
  return out;
}

// For every sample s_i with its segment p_i of `snapshot` (laid end to end): returns the
// (2, count) float64 norms ||s_i - p_i|| (NaN without a previous snapshot) and ||s_i||,
// and overwrites p_i with s_i, in one pass over memory.
at::Tensor update_norms(const std::vector<at::Tensor>& samples, at::Tensor snapshot,
                        bool have_previous) {
  const int64_t count = static_cast<int64_t>(samples.size());
  check_float_contiguous(snapshot);
  std::vector<int64_t> offsets(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) {
    check_float_contiguous(samples[i]);
    offsets[i + 1] = offsets[i] + samples[i].numel();
  }
  TORCH_CHECK(snapshot.numel() == offsets[count],
              "resnorm CPU kernel: the snapshot must hold every sample end to end");
  at::Tensor out = at::empty({2, count}, at::TensorOptions().dtype(at::kDouble));
  double* diff = out.data_ptr<double>();
  double* norm = diff + count;
  float* snap = snapshot.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* s = samples[i].data_ptr<float>();
      float* p = snap + offsets[i];
      const int64_t n = samples[i].numel();
      double d2 = 0.0, w2 = 0.0;
#pragma omp simd reduction(+ : d2, w2)
      for (int64_t j = 0; j < n; ++j) {
        const double v = s[j];
        const double d = v - p[j];
        d2 += d * d;
        w2 += v * v;
        p[j] = s[j];
      }
      diff[i] = have_previous ? std::sqrt(d2) : std::nan("");
      norm[i] = std::sqrt(w2);
    }
  });
  return out;
}

}  // namespace resnorm
