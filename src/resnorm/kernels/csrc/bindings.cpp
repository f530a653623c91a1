// The Python module of the compiled CPU kernel: the fused add+norm kernels, the output pool
// and the diagnostics Monitor's norm statistics (resnorm/kernels/cpu.py builds and loads it).
#include <torch/extension.h>

#include "add_norm_kernels.h"
#include "norm_stats.h"
#include "output_pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace resnorm;
  m.def("add_norm_fwd", &add_norm_fwd, "fused residual add + layer/RMS norm, forward");
  m.def("add_norm_bwd", &add_norm_bwd, "fused residual add + layer/RMS norm, backward");
  m.def("norms", &norms, "the norm of every tensor of a list, in one call");
  m.def("empty_output", &empty_output, "an uninitialized output, from the pool when large");
  m.def("configure_pool", &configure_pool, "output pool: min bytes (<0: off), max cached bytes");
  m.def("pool_stats", &pool_stats, "output pool counters");
  m.def("pool_empty_cache", &pool_empty_cache, "return the pool's free blocks to the OS");
  m.def("update_norms", &update_norms, "Monitor update norms against a snapshot, in one pass");
  m.def("unit_moments", &unit_moments, "unit sums over axis 0 and the sum of squares, float64");
}
