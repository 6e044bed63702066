// What the ops built on the low-rank core share (adapter, lora_linear, lora_linear_multi): the
// five optional gradients they return, and when the fused kernels of kernels/lowrank.h apply.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#ifdef PEFTKERN_WITH_CUDA
#include "kernels/lowrank.h"
#endif

namespace peftkern::ops {

using Grads5 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

#ifdef PEFTKERN_WITH_CUDA
// The fused kernels cover CUDA float32/float16/bfloat16 and r <= 256; the rest takes the composite.
inline bool lowrank_fused(const at::Tensor& x, int64_t r) {
  return x.is_cuda() && x.scalar_type() != at::kDouble && r <= kernels::kLowRankMaxFusedRank;
}
#endif

}  // namespace peftkern::ops
