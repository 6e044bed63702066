// What the ops built on the low-rank core share (adapter, adapter_multi, adapter_stack, lora_linear,
// lora_linear_multi): the five optional gradients they return, the activation argument, and when
// the fused kernels of kernels/lowrank.h apply.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "kernels/lowrank.h"
#endif

namespace peftkern::ops {

using Grads5 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

// Grads5 and the gradient of the per-row gate (adapter_backward, lora_linear_backward).
using Grads6 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

inline Grads6 with_gate_grad(Grads5 g, const at::Tensor& dgate) {
  auto& [a, b, c, d, e] = g;
  return {std::move(a), std::move(b), std::move(c), std::move(d), std::move(e), defined_or_none(dgate)};
}

// The optional per-row gate of a low-rank update on x [..., d]: x's dtype and device, shape
// x.shape[:-1]. Returns it flattened to [rows], contiguous.
inline std::optional<at::Tensor> check_gate(const char* op, const std::optional<at::Tensor>& gate, const at::Tensor& x) {
  if (!gate) return std::nullopt;
  check_like(*gate, op, "gate", x, "x");
  TORCH_CHECK_VALUE(gate->sizes() == x.sizes().slice(0, x.dim() - 1), op,
                    ": gate must have x's shape without its last dimension, ", x.sizes().slice(0, x.dim() - 1),
                    " (one value per row); got ", gate->sizes());
  return gate->reshape({-1}).contiguous();
}

// The adapters' activation argument (op names the op in the error).
inline Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'; got '", name, "'");
}

#ifdef PEFTKERN_WITH_CUDA
// The fused kernels cover CUDA float32/float16/bfloat16 and r <= 256 where their shared memory fits
// the device's per-block limit (forward and backward alike, so both passes take the same path):
// on sm_86/sm_89 (99 KB) float32 outside 17 <= r <= 32 and half types at r > 128 take the
// composite, on sm_80 (163 KB) float32 at r > 128 (bench/results/static_sm90.md lists the bytes).
inline bool lowrank_fused(const at::Tensor& x, int64_t r) {
  if (!x.is_cuda() || x.scalar_type() == at::kDouble || r > kernels::kLowRankMaxFusedRank) return false;
  const DType dtype = kernel_dtype(x.scalar_type());
  const int rank = static_cast<int>(std::max<int64_t>(r, 1));
  const size_t need = static_cast<size_t>(
      std::max(kernels::lowrank_forward_smem_bytes(dtype, rank), kernels::lowrank_backward_smem_bytes(dtype, rank)));
  return need <= at::cuda::getDeviceProperties(x.get_device())->sharedMemPerBlockOptin;
}

// Forward or backward launch args with the fields every low-rank launch shares set (the checks
// upstream keep n_in, n_out and r within 32 bits); the caller sets the pointers.
template <typename Args>
Args lowrank_args(const at::Tensor& x, Activation act, double scale, int64_t rows, int64_t n_in, int64_t n_out,
                  int64_t r) {
  Args a{};
  a.dtype = kernel_dtype(x.scalar_type());
  a.activation = act;
  a.scale = static_cast<float>(scale);
  a.rows = rows;
  a.n_in = static_cast<int>(n_in);
  a.n_out = static_cast<int>(n_out);
  a.r = static_cast<int>(r);
  if constexpr (std::is_same_v<Args, kernels::LowRankBackwardArgs>)
    a.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return a;
}
#endif

}  // namespace peftkern::ops
