// peftkern::dropout_mask: the dropout factors lora_linear applied for a saved (seed, offset), from
// the Philox mask of cpu/dropout.h or kernels/dropout.h (the same mask on both devices).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/dropout.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/dropout.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "dropout_mask";

at::Tensor dropout_mask(const at::Tensor& x, const at::Tensor& seed_offset, double p) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least 1 dimension; got ", x.sizes());
  TORCH_CHECK_VALUE(
      seed_offset.numel() == 2 && seed_offset.scalar_type() == at::kLong && seed_offset.device() == x.device(), kOp,
      ": seed_offset must be int64 [2] on x's device (", x.device(), "); got ", seed_offset.scalar_type(), " ",
      seed_offset.sizes(), " on ", seed_offset.device());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, kOp, ": p must be in [0, 1); got ", p);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  // Philox counters index rows in 32 bits, as lora_linear's dropout does.
  TORCH_CHECK_VALUE(p == 0.0 || rows < (int64_t(1) << 32), kOp, ": x must have fewer than 2^32 rows; got ", rows);
  const at::Tensor so = seed_offset.contiguous();
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
    kernels::DropoutArgs drop;
    drop.p = static_cast<float>(p);
    drop.seed_offset = so.data_ptr<int64_t>();
    C10_CUDA_CHECK(kernels::dropout_mask(rows, cols, drop, out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
    return out;
  }
#endif
  const int64_t* v = so.data_ptr<int64_t>();
  return cpu::dropout_mask(rows, cols, static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1]), p).view(x.sizes());
}

void register_impls(torch::Library& m) { m.impl("dropout_mask", fresh_outputs<&dropout_mask>); }

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
