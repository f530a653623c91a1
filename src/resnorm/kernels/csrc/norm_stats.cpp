// Per-tensor norms for the diagnostics Monitor: a whole model in one call instead of a
// dispatch per tensor. float32, contiguous; sums of squares in float64.
#include "norm_stats.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// Unit sums over axis 0 and the sum of squares, in float64. The units are split into fixed
// chunks (the same partial sums whatever the number of threads: reproducible), each chunk
// read row by row, its sums kept in cache.
std::tuple<at::Tensor, double> unit_moments(const at::Tensor& x) {
  check_float_contiguous(x);
  const bool rows = x.dim() >= 2;
  const int64_t n = rows ? x.size(0) : 1;
  const int64_t units = rows ? (n ? x.numel() / n : 0) : x.numel();
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor sums = rows ? at::zeros(x.sizes().slice(1), options) : at::zeros({1}, options);
  const float* p = x.data_ptr<float>();
  if (!rows) {  // one unit: its values summed in lanes
    double* s = sums.data_ptr<double>();
    constexpr int64_t lanes = 16;
    double acc[lanes] = {0.0}, sq[lanes] = {0.0};
    int64_t j = 0;
    for (; j + lanes <= units; j += lanes) {
#pragma omp simd
      for (int64_t k = 0; k < lanes; ++k) {
        const double v = p[j + k];
        acc[k] += v;
        sq[k] += v * v;
      }
    }
    double total = 0.0, squares = 0.0;
    for (; j < units; ++j) {
      total += p[j];
      squares += static_cast<double>(p[j]) * p[j];
    }
    for (int64_t k = 0; k < lanes; ++k) total += acc[k], squares += sq[k];
    s[0] = total;
    return {sums, squares};
  }
  constexpr int64_t chunk = 1024;  // units per chunk: 8 KiB of sums
  const int64_t chunks = (units + chunk - 1) / chunk;
  std::vector<double> partial(chunks, 0.0);
  double* s = sums.data_ptr<double>();
  at::parallel_for(0, chunks, n * chunk >= (1 << 16) ? 1 : chunks, [&](int64_t begin, int64_t end) {
    double q[chunk];  // per-unit sums of squares: the row loop stays a vertical one
    for (int64_t c = begin; c < end; ++c) {
      const int64_t u0 = c * chunk, width = std::min(units, u0 + chunk) - u0;
      double* __restrict su = s + u0;
      std::fill(q, q + width, 0.0);
      for (int64_t r = 0; r < n; ++r) {
        const float* __restrict row = p + r * units + u0;
#pragma omp simd
        for (int64_t u = 0; u < width; ++u) {
          const double v = row[u];
          su[u] += v;
          q[u] += v * v;
        }
      }
      double squares = 0.0;
      for (int64_t u = 0; u < width; ++u) squares += q[u];
      partial[c] = squares;
    }
  });
  double squares = 0.0;
  for (double v : partial) squares += v;
  return {sums, squares};
}

}  // namespace resnorm
