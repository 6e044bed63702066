// peftkern::masked_linear_multi: row t of x uses mask_bits_stack[task_ids[t]] (-1: the unmasked
// weight). CUDA, up to kMaskedMatvecMaxTokens rows: the mat-vec reads each row's task bits while it
// reads the weight; larger batches: one masked weight and one product per task present (under CUDA
// graph capture, every task's).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common.h"
#include "ops/mask_bits.h"

namespace peftkern::ops {
namespace {

at::Tensor masked_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& bits, const at::Tensor& task_ids) {
  const char* op = "masked_linear_multi";
  const LinearDims dims = check_linear(op, x, weight, bias);
  TORCH_CHECK_VALUE(bits.dim() == 3, op,
                    ": mask_bits_stack must have shape [tasks, out_features, ceil(in_features / 32)]; got ",
                    bits.sizes());
  const int64_t tasks = bits.size(0);
  check_bits(op, "mask_bits_stack", bits, {tasks}, dims.n_out, dims.n_in, x.device());
  check_ids(op, "task_ids", task_ids, dims.rows, "tokens", x, "x", -1, tasks,
            "[-1, tasks)");  // capture: out of range acts as -1
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  const auto out_shape = with_last(x.sizes(), dims.n_out);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && x.scalar_type() != at::kDouble && dims.rows <= kernels::kMaskedMatvecMaxTokens) {
    const c10::cuda::CUDAGuard guard(x.device());
    return packed_matvec(x2, weight, bias, bits, task_ids).view(out_shape);
  }
#endif
  const at::Tensor ids = task_ids.to(at::kLong);
  if (capturing(x)) {
    // No host read under capture: every task's product, each row keeping its own task's (slower:
    // tasks + 1 products); ids out of range keep the unmasked product, as the mat-vec does.
    at::Tensor out = base_product(x2, weight, bias);
    for (int64_t task = 0; task < tasks; ++task)
      out = at::where(ids.eq(task).unsqueeze(1), base_product(x2, unpack_apply(weight, bits[task]), bias), out);
    return out.view(out_shape);
  }
  // Larger batches: one masked weight and one product per task present (host reads which).
  at::Tensor out = at::empty({dims.rows, dims.n_out}, x.options());
  const at::Tensor present = std::get<0>(at::_unique(ids.cpu()));
  for (int64_t i = 0; i < present.numel(); ++i) {
    const int64_t task = present[i].item<int64_t>();
    const at::Tensor idx = (ids == task).nonzero().squeeze(1);
    const at::Tensor w = task < 0 ? weight : unpack_apply(weight, bits[task]);
    out.index_copy_(0, idx, base_product(x2.index_select(0, idx), w, bias));
  }
  return out.view(out_shape);
}

void register_impls(torch::Library& m) { m.impl("masked_linear_multi", fresh_outputs<&masked_multi>); }

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
