// All N adapters of a stack on the same tokens (AdapterFusion's inputs) as dense products, so x is
// read once for all N (one GEMM) and each adapter's output is written once (one batched GEMM):
//   z         = x @ w_down.view(N * r, d)^T + b_down.view(N * r)        [rows, N * r]
//   out[:, n] = scale * (act(z[:, n]) @ w_up[n]^T + b_up[n])             [rows, N, d]
// The CPU path, and on CUDA the only path (cuBLAS: the products in x's dtype with float32
// accumulation, the activation in float32). CPU math runs in float32 (float64 for float64).
// Inputs are checked by the caller; x is 2-D [rows, d].
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "kernels/kernel_types.h"

namespace peftkern::cpu {

// Returns (out [rows, N, d], z [rows, N, r] or an empty tensor when save_z is false), in x's dtype.
std::tuple<at::Tensor, at::Tensor> adapter_stack_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                         const std::optional<at::Tensor>& b_down,
                                                         const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                         Activation activation, double scale, bool save_z);

// grad_out [rows, N, d], z [rows, N, r]. Returns (dx, dw_down, db_down, dw_up, db_up); entries whose
// mask bit is false are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_stack_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, Activation activation, double scale, std::array<bool, 5> mask);

}  // namespace peftkern::cpu
