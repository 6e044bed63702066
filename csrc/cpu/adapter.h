// The bottleneck adapter as an ATen composite: peftkern's CPU path, and on CUDA the slow path for
// what the fused kernels do not cover (r > 256, float64). Inputs are 2-D [rows, d] and already
// checked; math runs in float32 (float64 for float64) and results take x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

#include "kernels/kernel_types.h"

namespace peftkern::cpu {

// Returns (out [rows, d], z [rows, r] or an empty tensor when save_z is false).
std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                   const c10::optional<at::Tensor>& b_down,
                                                   const at::Tensor& w_up,
                                                   const c10::optional<at::Tensor>& b_up,
                                                   const c10::optional<at::Tensor>& residual,
                                                   Activation activation, double scale, bool save_z);

// Returns (dx, dw_down, db_down, dw_up, db_up); entries whose mask bit is false are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, Activation activation, double scale, bool grad_out_into_dx,
    std::array<bool, 5> mask);

}  // namespace peftkern::cpu
