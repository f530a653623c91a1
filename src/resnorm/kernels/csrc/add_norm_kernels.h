// The fused residual add + LayerNorm / RMSNorm kernels for the CPU (add_norm_kernels.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace resnorm {

// Writes y (allocated here, x's dtype; rectified when `relu`), h = x + residual into `h_out`
// when given, and returns (y, mean, rstd); mean is empty for RMSNorm. `nontemporal` asks
// for non-temporal (streaming) stores of the float32 outputs, in both directions.
std::vector<at::Tensor> add_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, bool rms, double eps,
                                     const c10::optional<at::Tensor>& h_out, bool nontemporal,
                                     bool relu);

// Writes dx (allocated by the caller in dy's dtype) and returns (dweight, dbias) in float32,
// undefined when not asked for.
std::vector<at::Tensor> add_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh_in,
                                     const at::Tensor& h, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                     bool need_dw, bool need_db, const at::Tensor& dx,
                                     bool nontemporal, bool relu);

}  // namespace resnorm
