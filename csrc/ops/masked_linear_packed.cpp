// peftkern::masked_linear_packed: out = x @ (weight * m)^T + bias with m from packed bits (serving).
// CUDA, up to kMaskedMatvecMaxTokens rows: the mat-vec applies the bits while it reads the weight;
// larger batches build weight * m once for cuBLAS.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common.h"
#include "ops/mask_bits.h"

namespace peftkern::ops {
namespace {

at::Tensor masked_packed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& bits) {
  const char* op = "masked_linear_packed";
  const LinearDims dims = check_linear(op, x, weight, bias);
  check_bits(op, "mask_bits", bits, {}, dims.n_out, dims.n_in, x.device());
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  const auto out_shape = with_last(x.sizes(), dims.n_out);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && x.scalar_type() != at::kDouble && dims.rows <= kernels::kMaskedMatvecMaxTokens) {
    const c10::cuda::CUDAGuard guard(x.device());
    return packed_matvec(x2, weight, bias, bits, at::Tensor()).view(out_shape);
  }
#endif
  return base_product(x2, unpack_apply(weight, bits), bias).view(out_shape);
}

void register_impls(torch::Library& m) { m.impl("masked_linear_packed", fresh_outputs<&masked_packed>); }

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
