// What the ops built on the low-rank core share (adapter, adapter_multi, adapter_stack, lora_linear,
// lora_linear_multi): the five optional gradients they return, the activation argument, and when
// the fused kernels of kernels/lowrank.h apply.
#pragma once

#include <ATen/core/Tensor.h>

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

// The adapters' activation argument (op names the op in the error).
inline Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'; got '", name, "'");
}

#ifdef PEFTKERN_WITH_CUDA
// The fused kernels cover CUDA float32/float16/bfloat16 and r <= 256; the rest takes the composite.
inline bool lowrank_fused(const at::Tensor& x, int64_t r) {
  return x.is_cuda() && x.scalar_type() != at::kDouble && r <= kernels::kLowRankMaxFusedRank;
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
