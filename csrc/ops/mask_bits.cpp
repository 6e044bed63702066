// peftkern::pack_mask / unpack_mask: a mask (scores > threshold) as packed bits, and back as bool.
// CUDA: the mask_apply kernel of kernels/mask.h; CPU and float64: cpu/mask.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common.h"
#include "ops/mask_bits.h"

namespace peftkern::ops {
namespace {

at::Tensor pack_mask(const at::Tensor& scores, double threshold) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "pack_mask: scores must be a floating-point tensor; got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2, "pack_mask: scores must be 2-D [out_features, in_features]; got ",
                    scores.sizes());
#ifdef PEFTKERN_WITH_CUDA
  if (scores.is_cuda() && scores.scalar_type() != at::kDouble && scores.numel() > 0) {
    const c10::cuda::CUDAGuard guard(scores.device());
    const at::Tensor s = scores.contiguous();
    at::Tensor bits = at::empty({scores.size(0), mask_words(scores.size(1))}, scores.options().dtype(at::kInt));
    kernels::MaskApplyArgs a{};
    a.w_dtype = a.s_dtype = kernel_dtype(scores.scalar_type());
    a.rows = scores.size(0);
    a.cols = scores.size(1);
    a.threshold = static_cast<float>(threshold);
    a.scores = s.data_ptr();
    a.bits_out = bits.data_ptr<int32_t>();
    C10_CUDA_CHECK(kernels::mask_apply(a, at::cuda::getCurrentCUDAStream()));
    return bits;
  }
#endif
  return cpu::pack_bits(cpu::keep_mask(scores, threshold));
}

at::Tensor unpack_mask(const at::Tensor& bits, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0,
                    "unpack_mask: shape must be [out_features, in_features]; got ", shape);
  check_bits("unpack_mask", "bits", bits, {}, shape[0], shape[1], bits.device());
  return cpu::unpack_bits(bits, shape[1]);
}

void register_impls(torch::Library& m) {
  m.impl("pack_mask", fresh_outputs<&pack_mask>);
  m.impl("unpack_mask", fresh_outputs<&unpack_mask>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
