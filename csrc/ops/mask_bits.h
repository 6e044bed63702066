// What the glue of the packed-mask ops shares (masked_linear, masked_linear_packed,
// masked_linear_multi, pack_mask / unpack_mask): the bits' shape check, weight * mask from bits, and
// the CUDA mat-vec that applies bits while it reads the weight (kernels/mask.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "cpu/mask.h"
#include "kernels/kernel_types.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/mask.h"
#endif

namespace peftkern::ops {

// bits: int32 [*lead, n_out, ceil(n_in / 32)] on `device`.
inline void check_bits(const char* op, const char* name, const at::Tensor& bits, at::IntArrayRef lead, int64_t n_out,
                       int64_t n_in, const at::Device& device) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kInt, op, ": ", name, " must be int32 (packed by pack_mask); got ",
                   bits.scalar_type());
  TORCH_CHECK_VALUE(bits.device() == device, op, ": ", name, " is on ", bits.device(), " but x is on ", device);
  std::vector<int64_t> want(lead.begin(), lead.end());
  want.push_back(n_out);
  want.push_back(mask_words(n_in));
  TORCH_CHECK_VALUE(bits.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", at::IntArrayRef(want),
                    " ([.., out_features, ceil(in_features / 32)] words); got ", bits.sizes());
}

#ifdef PEFTKERN_WITH_CUDA
// out = x2 @ (weight * mask)^T + bias with the mask from bits (task_ids: per-token masks) on CUDA,
// for at most kMaskedMatvecMaxTokens rows.
inline at::Tensor packed_matvec(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& bits, const at::Tensor& task_ids) {
  const at::Tensor xc = x2.contiguous(), w = weight.contiguous(), bc = bits.contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x2.size(0), weight.size(0)}, x2.options());
  kernels::MaskedMatvecArgs a{};
  a.dtype = a.s_dtype = kernel_dtype(x2.scalar_type());
  a.tokens = x2.size(0);
  a.n_in = x2.size(1);
  a.n_out = weight.size(0);
  a.x = xc.data_ptr();
  a.weight = w.data_ptr();
  a.bias = data_or_null(b);
  a.bits = bc.data_ptr<int32_t>();
  const at::Tensor ids = task_ids.defined() ? task_ids.to(at::kLong).contiguous() : task_ids;
  a.task_ids = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  a.tasks = ids.defined() ? bits.size(0) : 0;
  a.out = out.data_ptr();
  C10_CUDA_CHECK(kernels::masked_matvec(a, at::cuda::getCurrentCUDAStream()));
  return out;
}

inline at::Tensor unpack_apply_cuda(const at::Tensor& weight, const at::Tensor& bits) {
  const at::Tensor w = weight.contiguous(), bc = bits.contiguous();
  at::Tensor w_eff = at::empty_like(w);
  kernels::MaskApplyArgs a{};
  a.w_dtype = a.s_dtype = kernel_dtype(weight.scalar_type());
  a.rows = weight.size(0);
  a.cols = weight.size(1);
  a.weight = w.data_ptr();
  a.bits_in = bc.data_ptr<int32_t>();
  a.w_eff = w_eff.data_ptr();
  C10_CUDA_CHECK(kernels::mask_apply(a, at::cuda::getCurrentCUDAStream()));
  return w_eff;
}
#endif

// weight * mask from packed bits.
inline at::Tensor unpack_apply(const at::Tensor& weight, const at::Tensor& bits) {
#ifdef PEFTKERN_WITH_CUDA
  if (weight.is_cuda() && weight.scalar_type() != at::kDouble) {
    const c10::cuda::CUDAGuard guard(weight.device());
    return unpack_apply_cuda(weight, bits);
  }
#endif
  return weight * cpu::unpack_bits(bits, weight.size(1));
}

}  // namespace peftkern::ops
