// The low-rank update of csrc/kernels/lowrank.h as an ATen composite (no dropout: callers pass
// x already dropped): peftkern's CPU path for the adapter and LoRA, and on CUDA the slow path for
// what the fused kernels do not cover (r > 256, float64). Inputs are 2-D and already checked;
// math runs in float32 (float64 for float64) and results take x's dtype.
//   z = x @ w_down^T + b_down,  out = res + scale * g * (act(z) @ w_up^T + b_up)
// g: an optional per-row gate [rows] (absent: 1).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <array>
#include <tuple>

#include "kernels/kernel_types.h"

namespace peftkern::cpu {

// act(z), and grad * act'(z), elementwise in z's dtype.
at::Tensor activate(const at::Tensor& z, Activation activation);
at::Tensor activate_backward(const at::Tensor& grad, const at::Tensor& z, Activation activation);

// Returns (out [rows, n_out], z [rows, r] or an empty tensor when save_z is false). res defaults to x.
std::tuple<at::Tensor, at::Tensor> lowrank_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual, Activation activation,
                                                   double scale, bool save_z,
                                                   const std::optional<at::Tensor>& gate = std::nullopt);

// Returns (dx, dw_down, db_down, dw_up, db_up); entries whose mask bit is false are undefined.
// grad_out_into_dx: dx also gets grad_out (the residual was x). With the forward's gate, every
// gradient carries it, and dgate (when not null) gets the gate's gradient [rows] in x's dtype
// (b_up: the forward's, for its term scale * grad_out @ b_up).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, Activation activation, double scale, bool grad_out_into_dx, std::array<bool, 5> mask,
    const std::optional<at::Tensor>& gate = std::nullopt, const std::optional<at::Tensor>& b_up = std::nullopt,
    at::Tensor* dgate = nullptr);

}  // namespace peftkern::cpu
