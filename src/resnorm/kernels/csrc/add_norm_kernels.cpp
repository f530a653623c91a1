// Fused residual add + LayerNorm / RMSNorm for the CPU: one pass over memory per direction.
//
// Each row is read once from memory into a float32 scratch row that stays in cache (rows
// go in blocks of about 128 KiB: see block_rows), the statistics are computed from it in
// two passes (the mean, then the centred sum of squares: no precision is lost to a large
// mean), and each output is written once. The
// reductions keep many independent partial sums so that they run at load speed, not at
// the latency of one chain of additions. Large float32 outputs are written with
// non-temporal (streaming) stores, which skip the read-for-ownership of the destination
// line: that is a third of the traffic of a store-bound kernel. Rows are split over
// PyTorch's own thread pool (at::parallel_for, so torch.set_num_threads applies).
//
// Inputs are float32 or bfloat16 (float32 accumulation); rows may have any stride, the
// elements of a row must be contiguous. The Python side (resnorm/kernels/cpu.py) checks
// shapes and dtypes and allocates the outputs whose dtype it decides.
//
// The outputs y and dx come from the output pool (output_pool.h) when large.
#include "add_norm_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "output_pool.h"

namespace resnorm {
namespace {

// Independent partial sums per reduction: one AVX-512 register. 64 (four registers) made
// rows of 128 to 256 slower than eager (0.85-0.93x; 16: 1.12-1.25x), the final reduction
// costing as much as the row itself, and bought nothing on wide rows.
constexpr int64_t kLanes = 16;

struct bf16 {
  uint16_t bits;
};
struct Absent {};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void put(float* p, float v) { *p = v; }
inline void put(bf16* p, float f) {  // round to nearest even; NaN stays a quiet NaN (as c10)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = static_cast<uint16_t>(u >> 16);
}

// The sum of kLanes partial sums, pairwise: log2(kLanes) vector steps, not a chain of
// kLanes dependent scalar additions (which would dominate short rows).
inline float reduce_lanes(float* acc) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// The end of a centred sum of squares: sum((p[j] - mean)^2) over the scalar tail from j,
// plus the kLanes partial sums of the whole vectors before it.
inline float centred_finish(const float* __restrict p, int64_t j, int64_t n, float mean,
                            float* acc) {
  float s = 0.0f;
  for (; j < n; ++j) {
    const float c = p[j] - mean;
    s += c * c;
  }
  return s + (n >= kLanes ? reduce_lanes(acc) : 0.0f);
}

// sum((p[j] - mean)^2) with kLanes independent accumulators.
inline float centred_squares(const float* __restrict p, int64_t n, float mean) {
  float acc[kLanes] = {0.0f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) {
      const float c = p[j + k] - mean;
      acc[k] += c * c;
    }
  }
  return centred_finish(p, j, n, mean, acc);
}

// One streaming (non-temporal) store of a vector of floats, and how many floats that is
// (0 where the compiler targets neither AVX-512 nor AVX).
#if defined(__AVX512F__)
constexpr int64_t kStreamFloats = 16;
inline void stream_store(float* dst, const float* src) {
  _mm512_stream_ps(dst, _mm512_loadu_ps(src));
}
#elif defined(__AVX__)
constexpr int64_t kStreamFloats = 8;
inline void stream_store(float* dst, const float* src) {
  _mm256_stream_ps(dst, _mm256_loadu_ps(src));
}
#else
constexpr int64_t kStreamFloats = 0;
inline void stream_store(float* dst, const float* src) { *dst = *src; }
#endif

// Copies a float32 row to its destination: streaming stores when asked and the row is
// aligned for them, ordinary stores otherwise.
inline void write_row(float* __restrict dst, const float* __restrict src, int64_t n,
                      bool nontemporal) {
  if (kStreamFloats > 0 && nontemporal &&
      reinterpret_cast<uintptr_t>(dst) % (kStreamFloats * sizeof(float)) == 0) {
    int64_t j = 0;
    for (; j + kStreamFloats <= n; j += kStreamFloats) stream_store(dst + j, src + j);
    for (; j < n; ++j) dst[j] = src[j];
    return;
  }
  std::memcpy(dst, src, n * sizeof(float));
}

inline void write_row(bf16* __restrict dst, const float* __restrict src, int64_t n, bool) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) put(dst + j, src[j]);
}

inline void finish_streaming() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();  // streaming stores are weakly ordered: make them visible before returning
#endif
}

// Whether the last page of a freshly allocated output is already in memory (not the
// first: the allocator writes its header there). A large
// allocation the allocator serves with fresh pages from the OS (glibc: 32 MiB and more) is
// faulted in, zeroed, on first touch; streaming stores then write around the zeroed lines
// the fault just put in cache and cost more than they save. Memory the allocator reuses is
// resident, and there streaming stores save the read-for-ownership.
bool resident(const at::Tensor& t) {
#if defined(__linux__)
  static const long page = sysconf(_SC_PAGESIZE);
  if (t.numel() == 0) return true;
  const uintptr_t address = reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes() - 1;
  unsigned char in_core = 0;
  void* start = reinterpret_cast<void*>(address - address % page);
  if (mincore(start, 1, &in_core) != 0) return true;
  return (in_core & 1) != 0;
#else
  (void)t;
  return true;
#endif
}

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "resnorm CPU kernel: dtype must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1) &&
                  (t.stride(1) == 1 || t.size(1) <= 1),
              "resnorm CPU kernel: ", name, " must be a (rows, n) tensor with contiguous rows");
  is_bf16(t);
}

std::vector<float> as_float_vector(const c10::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->numel() == n, "resnorm CPU kernel: weight/bias must have ", n, " elements");
    at::Tensor c = t->to(at::kFloat).contiguous();
    std::memcpy(out.data(), c.data_ptr<float>(), n * sizeof(float));
  }
  return out;
}

// Rows per block. Each thread walks its rows in blocks of about kBlockBytes of float32
// (in L2): the memory-bound pass of the whole block (reading the inputs), then the passes
// that finish each row from cache (writing the outputs). Streams of loads, then of stores,
// each long enough for the hardware prefetchers; row by row, the switch between them at
// every row cost 10 to 30% (measured, 768 to 4,096 wide rows).
constexpr int64_t kBlockBytes = 128 << 10;
int64_t block_rows(int64_t n) {
  return std::max<int64_t>(1, kBlockBytes / (4 * std::max<int64_t>(n, 1)));
}

// A float32 work area of at least `count` elements, owned by the calling thread and kept
// between calls: allocating it per call put a 128 KiB malloc (glibc's initial mmap
// threshold) and its page faults in every call of every worker thread.
float* thread_scratch(size_t count) {
  thread_local std::vector<float> area;
  if (area.size() < count) area.resize(count);
  return area.data();
}

// Rows per task: enough work per task that small inputs stay on one thread.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename T>
T* row_ptr(const at::Tensor* t, int64_t i) {
  return t ? static_cast<T*>(t->data_ptr()) + i * t->stride(0) : nullptr;
}

template <typename T>
constexpr bool kPresent = !std::is_same_v<T, Absent>;  // an optional operand is given

// The float32 row the forward passes work on: h's own row when h is float32 and written
// through the cache (it is in cache for the passes that follow, and no copy is stored
// twice), else the thread's scratch row.
template <typename TH>
inline float* work_row(TH* hr, float* scratch_row, bool nontemporal) {
  if constexpr (std::is_same_v<TH, float>) {
    if (!nontemporal) return hr;
  }
  (void)hr;
  (void)nontemporal;
  return scratch_row;
}

// ---------------------------------------------------------------------------------------
// Forward: h = x + residual; z = (h - mean) * rstd * w + b (LayerNorm) or h * rstd * w (RMS);
// y = z, or max(z, 0) with the fused ReLU.

// z, spelled once for the forward and the backward: the backward's ReLU mask (z > 0) must
// be computed from values bit-identical to those the forward rectified.
inline float normalized(float hv, float mu, float r) { return (hv - mu) * r; }
inline float affine(float xv, float w, float b) { return xv * w + b; }
// max(z, lo): lo = 0 is the ReLU, lo = -inf the identity; NaN stays NaN, as in torch.relu.
inline float activate(float z, float lo) { return z < lo ? lo : z; }

// What pass 1 of the forward sums over a row: h (LayerNorm), h and the previous row's
// centred squares (LayerNorm, see fwd_rows), or h^2 (RMSNorm). A template parameter, so
// that each sum is one plain expression the compiler contracts alike (into FMAs) in
// add_row's loop and in add_row_streaming's intrinsics.
enum class Sums { kH, kHAndCentred, kSquares };

// Pass 1 of the forward over one row, in whole vectors: buf = h = x + residual (also put
// into h's own row unless `skip_h`), and the sums of `S` into acc (and cacc:
// (prev - prev_mu)^2). Returns where the scalar tail starts.
template <Sums S, typename TX, typename TR, typename TH>
inline int64_t add_row(const TX* __restrict xr, const TR* __restrict rr, TH* __restrict hr,
                       float* __restrict buf, const float* __restrict prev, float prev_mu,
                       int64_t n, bool skip_h, float* __restrict acc, float* __restrict cacc) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) {
      float v = to_float(xr[j + k]);
      if constexpr (kPresent<TR>) v += to_float(rr[j + k]);
      if constexpr (kPresent<TH>) {
        if (!skip_h) put(hr + j + k, v);
      }
      buf[j + k] = v;
      if constexpr (S == Sums::kSquares) {
        acc[k] += v * v;  // RMSNorm needs the sum of squares only
      } else {
        acc[k] += v;
      }
      if constexpr (S == Sums::kHAndCentred) {
        const float c = prev[j + k] - prev_mu;
        cacc[k] += c * c;
      }
    }
  }
  return j;
}

// y = activate(affine(normalized(h))) of one float32 row, streamed straight from registers
// to its destination (no trip through L1 and back); false, doing nothing, where that needs
// AVX-512 the compiler does not target or an unaligned destination. The same operations as
// the scalar spelling (the compiler contracts affine's multiply-add into one FMA there too),
// so bit-identical results.
inline bool stream_normalized_row(float* __restrict yr, const float* __restrict hv,
                                  const float* __restrict w, const float* __restrict b,
                                  float mu, float r, float lo, int64_t n) {
#if defined(__AVX512F__)
  if (reinterpret_cast<uintptr_t>(yr) % 64 != 0) return false;
  const __m512 vmu = _mm512_set1_ps(mu), vr = _mm512_set1_ps(r), vlo = _mm512_set1_ps(lo);
  int64_t q = 0;
  for (; q + 16 <= n; q += 16) {
    const __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(hv + q), vmu), vr);
    const __m512 y = _mm512_fmadd_ps(z, _mm512_loadu_ps(w + q), _mm512_loadu_ps(b + q));
    _mm512_stream_ps(yr + q, _mm512_max_ps(vlo, y));  // max(lo, y): y where y is NaN
  }
  for (; q < n; ++q) yr[q] = activate(affine(normalized(hv[q], mu, r), w[q], b[q]), lo);
  return true;
#else
  (void)yr, (void)hv, (void)w, (void)b, (void)mu, (void)r, (void)lo, (void)n;
  return false;
#endif
}

// add_row for float32 x (and residual) whose float32 h is streamed: h goes from registers
// to memory with a streaming store, besides into buf, instead of being copied from buf
// afterwards. false, doing nothing, without AVX-512 or where h's row is not aligned. Same
// operations as add_row (bit-identical sums).
template <Sums S, typename TR>
inline bool add_row_streaming(const float* __restrict xr, const TR* __restrict rr,
                              float* __restrict hr, float* __restrict buf,
                              const float* __restrict prev, float prev_mu, int64_t n,
                              float* __restrict acc, float* __restrict cacc, int64_t* done) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "one AVX-512 register of partial sums");
  if (reinterpret_cast<uintptr_t>(hr) % 64 != 0) return false;
  __m512 va = _mm512_setzero_ps(), vc = _mm512_setzero_ps();
  const __m512 vmu = _mm512_set1_ps(prev_mu);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(xr + j);
    if constexpr (kPresent<TR>) v = _mm512_add_ps(v, _mm512_loadu_ps(rr + j));
    _mm512_storeu_ps(buf + j, v);
    _mm512_stream_ps(hr + j, v);
    if constexpr (S == Sums::kSquares) {
      va = _mm512_fmadd_ps(v, v, va);
    } else {
      va = _mm512_add_ps(va, v);
    }
    if constexpr (S == Sums::kHAndCentred) {
      const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(prev + j), vmu);
      vc = _mm512_fmadd_ps(c, c, vc);
    }
  }
  _mm512_storeu_ps(acc, va);
  _mm512_storeu_ps(cacc, vc);
  *done = j;
  return true;
#else
  (void)xr, (void)rr, (void)hr, (void)buf, (void)prev, (void)prev_mu, (void)n, (void)acc;
  (void)cacc, (void)done;
  return false;
#endif
}

struct FwdArgs {
  const at::Tensor& x;
  const at::Tensor* res;   // null: no residual
  const at::Tensor* hout;  // null: h is not stored
  const at::Tensor& y;
  const float* w;
  const float* b;
  bool rms, relu;
  float eps;
  float* mean_p;  // null for RMSNorm
  float* rstd_p;
  bool nontemporal;
};

template <typename TX, typename TR, typename TH>
void fwd_rows(const FwdArgs& a) {
  const at::Tensor& x = a.x;
  const float* w = a.w;
  const float* b = a.b;
  const bool rms = a.rms, nontemporal = a.nontemporal;
  const float lo = a.relu ? 0.0f : -std::numeric_limits<float>::infinity();
  const int64_t rows = x.size(0), n = x.size(1);
  const float inv_n = 1.0f / static_cast<float>(n);
  const int64_t block = block_rows(n);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    const int64_t block_rows_here = std::min(block, end - begin);
    float* sums = thread_scratch(static_cast<size_t>(block_rows_here * (n + 2)));
    float* centred = sums + block_rows_here;  // LayerNorm: each row's centred sum of squares
    float* scratch = centred + block_rows_here;
    for (int64_t i0 = begin; i0 < end; i0 += block) {
      const int64_t i1 = std::min(end, i0 + block);
      // Pass 1 over the block: h = x + residual, into scratch (and h), summed. LayerNorm's
      // centred sum of squares (two-pass statistics) of each row is taken in the next row's
      // loop, from L1, between that loop's loads from memory: taken in a loop of its own it
      // stalled the memory stream (10% of the forward at 16,384 x 1,024; 3-7% at 8,192 x 256
      // when taken from the block in L2). Same operations in the same order as centred_squares,
      // so bit-identical results.
      // Row k's float32 work row (see work_row).
      auto row_buf = [&](int64_t k) {
        return work_row<TH>(row_ptr<TH>(a.hout, k), scratch + (k - i0) * n, nontemporal);
      };
      for (int64_t i = i0; i < i1; ++i) {
        const TX* xr = row_ptr<const TX>(&x, i);
        const TR* rr = row_ptr<const TR>(a.res, i);
        TH* hr = row_ptr<TH>(a.hout, i);
        // Spelled out here, not row_buf: through the lambda this loop measured 5% slower
        // (16,384 x 1,024 forward).
        float* buf = work_row<TH>(hr, scratch + (i - i0) * n, nontemporal);
        const bool in_h = static_cast<void*>(buf) == static_cast<void*>(hr);
        // The previous row of the block, whose centred sum this row's loop takes (LayerNorm).
        const float* prev =
            (rms || i == i0)
                ? nullptr
                : work_row<TH>(row_ptr<TH>(a.hout, i - 1), scratch + (i - 1 - i0) * n,
                               nontemporal);
        const float prev_mu = prev ? sums[i - 1 - i0] * inv_n : 0.0f;
        float acc[kLanes] = {0.0f};
        float cacc[kLanes] = {0.0f};
        int64_t jv = 0;
        bool h_streamed = false;  // float32 h written by the loop's streaming stores
        auto pass1 = [&](auto sums_tag) {
          constexpr Sums S = decltype(sums_tag)::value;
          if constexpr (std::is_same_v<TX, float> && std::is_same_v<TH, float>) {
            if (nontemporal)
              h_streamed =
                  add_row_streaming<S>(xr, rr, hr, buf, prev, prev_mu, n, acc, cacc, &jv);
          }
          if (!h_streamed)
            jv = add_row<S>(xr, rr, hr, buf, prev, prev_mu, n, nontemporal || in_h, acc, cacc);
        };
        if (rms)
          pass1(std::integral_constant<Sums, Sums::kSquares>{});
        else if (prev)
          pass1(std::integral_constant<Sums, Sums::kHAndCentred>{});
        else
          pass1(std::integral_constant<Sums, Sums::kH>{});
        float s = 0.0f;
        for (int64_t j = jv; j < n; ++j) {
          float v = to_float(xr[j]);
          if constexpr (kPresent<TR>) v += to_float(rr[j]);
          if constexpr (kPresent<TH>) {
            if (!nontemporal && !in_h) put(hr + j, v);
          }
          buf[j] = v;
          s += rms ? v * v : v;
        }
        if constexpr (kPresent<TH>) {
          if (nontemporal && h_streamed) {
            for (int64_t j = jv; j < n; ++j) put(hr + j, buf[j]);
          } else if (nontemporal) {
            write_row(hr, buf, n, true);
          }
        }
        if (n >= kLanes) s += reduce_lanes(acc);
        sums[i - i0] = s;
        if (prev) centred[i - 1 - i0] = centred_finish(prev, jv, n, prev_mu, cacc);
      }
      // The block's last row has no next row to take its centred sum.
      if (!rms) {
        centred[i1 - 1 - i0] = centred_squares(row_buf(i1 - 1), n, sums[i1 - 1 - i0] * inv_n);
      }
      for (int64_t i = i0; i < i1; ++i) {
        float* buf = row_buf(i);
        TX* yr = row_ptr<TX>(&a.y, i);
        const float s = sums[i - i0];
        // RMSNorm has its sum of squares from pass 1, with nothing to centre.
        const float mu = rms ? 0.0f : s * inv_n;
        const float r = 1.0f / std::sqrt((rms ? s : centred[i - i0]) * inv_n + a.eps);
        if (a.mean_p) a.mean_p[i] = mu;
        a.rstd_p[i] = r;
        // Pass 3: y, straight to its row (through L1 and streaming stores when streaming).
        bool streamed = false;  // float32 y: straight from registers to memory
        if constexpr (std::is_same_v<TX, float>)
          streamed = nontemporal && stream_normalized_row(yr, buf, w, b, mu, r, lo, n);
        if (streamed) {
        } else if (nontemporal) {
#pragma omp simd
          for (int64_t q = 0; q < n; ++q)
            buf[q] = activate(affine(normalized(buf[q], mu, r), w[q], b[q]), lo);
          write_row(yr, buf, n, true);
        } else {
#pragma omp simd
          for (int64_t q = 0; q < n; ++q)
            put(yr + q, activate(affine(normalized(buf[q], mu, r), w[q], b[q]), lo));
        }
      }
    }
    finish_streaming();
  });
}

template <typename TX, typename TR>
void fwd_h(const FwdArgs& a) {
  if (!a.hout)
    fwd_rows<TX, TR, Absent>(a);
  else if (is_bf16(*a.hout))
    fwd_rows<TX, TR, bf16>(a);
  else
    fwd_rows<TX, TR, float>(a);
}

template <typename TX>
void fwd_r(const FwdArgs& a) {
  if (!a.res)
    fwd_h<TX, Absent>(a);
  else if (is_bf16(*a.res))
    fwd_h<TX, bf16>(a);
  else
    fwd_h<TX, float>(a);
}

// ---------------------------------------------------------------------------------------
// Backward. With xhat = (h - mean) * rstd and g = dy * w (dy masked by z > 0 first, with
// the fused ReLU; z recomputed from h, so nothing more is stored or read):
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_in   (RMSNorm: without mean(g))
//   dw = sum over rows of dy * xhat, db = sum over rows of dy.

// Pass 2 of the backward for one row of float32 h, dy and dx, dx streamed straight from
// registers to its destination (no trip through L1 and back); false, doing nothing,
// without AVX-512 or where dx's row is not aligned. The same operations as bwd_rows' loop.
template <bool Relu, typename TI>
inline bool stream_dx_row(float* __restrict dxr, const float* __restrict hr,
                          const float* __restrict dyr, const TI* __restrict ir,
                          const float* __restrict w, const float* __restrict b, float mu,
                          float r, float s1, float s2, int64_t n) {
#if defined(__AVX512F__)
  if (reinterpret_cast<uintptr_t>(dxr) % 64 != 0) return false;
  const __m512 vmu = _mm512_set1_ps(mu), vr = _mm512_set1_ps(r);
  const __m512 vs1 = _mm512_set1_ps(s1), vs2 = _mm512_set1_ps(s2);
  int64_t q = 0;
  for (; q + 16 <= n; q += 16) {
    const __m512 xv = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(hr + q), vmu), vr);
    __m512 g = _mm512_loadu_ps(dyr + q);
    const __m512 wv = _mm512_loadu_ps(w + q);
    if constexpr (Relu) {  // dy where affine(xv) > 0, else 0 (NaN included)
      const __m512 z = _mm512_fmadd_ps(xv, wv, _mm512_loadu_ps(b + q));
      g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), g);
    }
    __m512 v = _mm512_mul_ps(_mm512_fmsub_ps(g, wv, _mm512_fmadd_ps(xv, vs1, vs2)), vr);
    if constexpr (kPresent<TI>) v = _mm512_add_ps(v, _mm512_loadu_ps(ir + q));
    _mm512_stream_ps(dxr + q, v);
  }
  for (; q < n; ++q) {
    const float xv = normalized(hr[q], mu, r);
    float g = dyr[q];
    if constexpr (Relu) g = affine(xv, w[q], b[q]) > 0.0f ? g : 0.0f;
    float v = (g * w[q] - (xv * s1 + s2)) * r;
    if constexpr (kPresent<TI>) v += ir[q];
    dxr[q] = v;
  }
  return true;
#else
  (void)dxr, (void)hr, (void)dyr, (void)ir, (void)w, (void)b, (void)mu, (void)r, (void)s1;
  (void)s2, (void)n;
  return false;
#endif
}

struct BwdArgs {
  const at::Tensor& dy;
  const at::Tensor* dh_in;  // null: no gradient reached the stream output h
  const at::Tensor& h;
  const float* w;
  const float* b;  // for the ReLU mask
  const float* mean_p;  // null for RMSNorm
  const float* rstd_p;
  bool rms, relu;
  const at::Tensor& dx;
  float* partial;  // per thread: n dweight then n dbias partial sums
  bool need_dw, need_db, nontemporal;
};

template <typename TD, typename TH, typename TI, bool Relu>
void bwd_rows(const BwdArgs& a) {
  const at::Tensor& h = a.h;
  const float* w = a.w;
  const float* b = a.b;
  const bool nontemporal = a.nontemporal;
  const int64_t rows = h.size(0), n = h.size(1);
  const float inv_n = 1.0f / static_cast<float>(n);
  // In blocks of rows (see block_rows) when dx is written through the cache; row by row
  // when streamed, where re-reading h and dy from L2 rather than L1 measured slower.
  const int64_t block = nontemporal ? 1 : block_rows(n);
  // dy, masked by the ReLU's derivative (1 where z > 0; 0 elsewhere, NaN included).
  auto grad = [&](float dyv, float xv, int64_t q) {
    if constexpr (Relu) return affine(xv, w[q], b[q]) > 0.0f ? dyv : 0.0f;
    (void)xv;
    (void)q;
    return dyv;
  };
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    float* sums = thread_scratch(static_cast<size_t>(2 * block + n));
    float* out = sums + 2 * block;
    float* dw_acc = a.partial + at::get_thread_num() * 2 * n;
    float* db_acc = dw_acc + n;
    const bool need_params = a.need_dw || a.need_db;
    for (int64_t i0 = begin; i0 < end; i0 += block) {
      const int64_t i1 = std::min(end, i0 + block);
      for (int64_t i = i0; i < i1; ++i) {
        const TH* hr = row_ptr<const TH>(&h, i);
        const TD* dyr = row_ptr<const TD>(&a.dy, i);
        const float mu = a.mean_p ? a.mean_p[i] : 0.0f;
        const float r = a.rstd_p[i];
        // Pass 1 (reads h and dy from memory): the two row sums and, while the values are
        // in registers, the per-thread dweight/dbias partial sums.
        float c1[kLanes] = {0.0f}, c2[kLanes] = {0.0f};
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) {
          if (need_params) {
#pragma omp simd
            for (int64_t k = 0; k < kLanes; ++k) {
              const float xv = normalized(to_float(hr[j + k]), mu, r);
              const float gv = grad(to_float(dyr[j + k]), xv, j + k);
              c1[k] += gv * w[j + k] * xv;
              c2[k] += gv * w[j + k];
              dw_acc[j + k] += gv * xv;
              db_acc[j + k] += gv;
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < kLanes; ++k) {
              const float xv = normalized(to_float(hr[j + k]), mu, r);
              const float gv = grad(to_float(dyr[j + k]), xv, j + k);
              c1[k] += gv * w[j + k] * xv;
              c2[k] += gv * w[j + k];
            }
          }
        }
        float s1 = 0.0f, s2 = 0.0f;
        for (; j < n; ++j) {
          const float xv = normalized(to_float(hr[j]), mu, r);
          const float gv = grad(to_float(dyr[j]), xv, j);
          s1 += gv * w[j] * xv;
          s2 += gv * w[j];
          if (need_params) {
            dw_acc[j] += gv * xv;
            db_acc[j] += gv;
          }
        }
        if (n >= kLanes) {
          s1 += reduce_lanes(c1);
          s2 += reduce_lanes(c2);
        }
        sums[2 * (i - i0)] = s1 * inv_n;
        sums[2 * (i - i0) + 1] = a.rms ? 0.0f : s2 * inv_n;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const TH* hr = row_ptr<const TH>(&h, i);
        const TD* dyr = row_ptr<const TD>(&a.dy, i);
        const float mu = a.mean_p ? a.mean_p[i] : 0.0f;
        const float r = a.rstd_p[i];
        const float s1 = sums[2 * (i - i0)], s2 = sums[2 * (i - i0) + 1];
        // Pass 2 (h and dy are in cache now): dx, plus the stream's gradient dh_in, into
        // dx's own row when it is float32 and written through the cache.
        TD* dxr = row_ptr<TD>(&a.dx, i);
        const TI* ir = row_ptr<const TI>(a.dh_in, i);
        if constexpr (std::is_same_v<TD, float> && std::is_same_v<TH, float> &&
                      !std::is_same_v<TI, bf16>) {
          if (nontemporal && stream_dx_row<Relu>(dxr, hr, dyr, ir, w, b, mu, r, s1, s2, n))
            continue;
        }
        float* o = work_row<TD>(dxr, out, nontemporal);
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) {
          const float xv = normalized(to_float(hr[q]), mu, r);
          float v = (grad(to_float(dyr[q]), xv, q) * w[q] - (xv * s1 + s2)) * r;
          if constexpr (kPresent<TI>) v += to_float(ir[q]);
          o[q] = v;
        }
        if (static_cast<void*>(o) != static_cast<void*>(dxr)) write_row(dxr, o, n, nontemporal);
      }
    }
    finish_streaming();
  });
}

template <typename TD, typename TH, typename TI>
void bwd_a(const BwdArgs& a) {
  if (a.relu)
    bwd_rows<TD, TH, TI, true>(a);
  else
    bwd_rows<TD, TH, TI, false>(a);
}

template <typename TD, typename TH>
void bwd_i(const BwdArgs& a) {
  if (!a.dh_in)
    bwd_a<TD, TH, Absent>(a);
  else if (is_bf16(*a.dh_in))
    bwd_a<TD, TH, bf16>(a);
  else
    bwd_a<TD, TH, float>(a);
}

template <typename TD>
void bwd_h(const BwdArgs& a) {
  if (is_bf16(a.h))
    bwd_i<TD, bf16>(a);
  else
    bwd_i<TD, float>(a);
}

}  // namespace

// Writes y (allocated here, x's dtype; rectified when `relu`), h = x + residual into `h_out`
// when given, and returns (y, mean, rstd); mean is empty for RMSNorm.
std::vector<at::Tensor> add_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, bool rms, double eps,
                                     const c10::optional<at::Tensor>& h_out, bool nontemporal,
                                     bool relu) {
  TORCH_CHECK(x.dim() == 2, "resnorm CPU kernel: x must be (rows, n)");
  check_rows(x, x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor* res = residual.has_value() && residual->defined() ? &*residual : nullptr;
  const at::Tensor* hout = h_out.has_value() && h_out->defined() ? &*h_out : nullptr;
  if (res) check_rows(*res, x, "residual");
  if (hout) check_rows(*hout, x, "h_out");
  at::Tensor y = empty_output(rows, n, x.scalar_type());
  at::Tensor mean = at::empty({rms ? 0 : rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {y, mean, rstd};
  const std::vector<float> w = as_float_vector(weight, n, 1.0f);
  const std::vector<float> b = as_float_vector(bias, n, 0.0f);
  const FwdArgs args{x, res, hout, y, w.data(), b.data(), rms, relu, static_cast<float>(eps),
                     rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                     nontemporal && resident(y) && (!hout || resident(*hout))};
  if (is_bf16(x))
    fwd_r<bf16>(args);
  else
    fwd_r<float>(args);
  return {y, mean, rstd};
}

// Writes dx (allocated by the caller in dy's dtype): the gradient of h, hence of x and of
// the residual alike, plus dh_in, the gradient that reached the residual stream output.
// With `relu`, dy is the gradient of the rectified y (bias is then needed for the mask).
// Returns (dweight, dbias) in float32, undefined when not asked for.
std::vector<at::Tensor> add_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh_in,
                                     const at::Tensor& h, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                     bool need_dw, bool need_db, const at::Tensor& dx,
                                     bool nontemporal, bool relu) {
  TORCH_CHECK(h.dim() == 2, "resnorm CPU kernel: h must be (rows, n)");
  check_rows(h, h, "h");
  check_rows(dy, h, "dy");
  check_rows(dx, h, "dx");
  TORCH_CHECK(dx.scalar_type() == dy.scalar_type(), "resnorm CPU kernel: dx must have dy's dtype");
  const at::Tensor* dhi = dh_in.has_value() && dh_in->defined() ? &*dh_in : nullptr;
  if (dhi) check_rows(*dhi, h, "dh_in");
  const int64_t rows = h.size(0), n = h.size(1);
  TORCH_CHECK(rstd.numel() == rows && (rms || mean.numel() == rows),
              "resnorm CPU kernel: mean/rstd must have one value per row");
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, 2, n}, h.options().dtype(at::kFloat));
  if (rows > 0 && n > 0) {
    const std::vector<float> w = as_float_vector(weight, n, 1.0f);
    const std::vector<float> b = as_float_vector(relu ? bias : c10::optional<at::Tensor>(), n, 0.0f);
    const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    const BwdArgs args{dy, dhi, h, w.data(), b.data(),
                       rms ? nullptr : mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(),
                       rms, relu, dx, partial.data_ptr<float>(), need_dw, need_db,
                       nontemporal && resident(dx)};
    if (is_bf16(dy))
      bwd_h<bf16>(args);
    else
      bwd_h<float>(args);
  }
  // Two separate reductions, so that the returned gradients do not share storage.
  return {need_dw ? partial.select(1, 0).sum(0) : at::Tensor(),
          need_db ? partial.select(1, 1).sum(0) : at::Tensor()};
}

}  // namespace resnorm
