// peftkern::lora_linear_multi_forward / lora_linear_multi_backward (one base, many LoRA adapters,
// each token its own): out[t] = base(x[t]) + scalings[i] * (x[t] @ lora_A[i]^T) @ lora_B[i]^T with
// i = adapter_ids[t] (i = -1: base only). CUDA forward: tokens grouped by adapter on the device, then
// the fused low-rank kernel of kernels/lowrank.h with one adapter per 64-token block. CPU, the
// backward, and CUDA float64 or r > 256: a per-adapter composite (it reads the per-adapter token
// counts on the host; under CUDA graph capture it masks rows instead, slower).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <utility>

#include "ops/common.h"
#include "ops/lowrank.h"
#include "ops/multi_adapter.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kMultiOp = "lora_linear_multi";

struct MultiDims {
  int64_t rows, n_in, n_out, r, adapters;
};

MultiDims check_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                      const at::Tensor& scalings, bool check_id_values) {
  const auto [rows, n_in, n_out] = check_linear(kMultiOp, x, weight, bias);
  check_like(lora_A, kMultiOp, "lora_A", x, "x");
  check_like(lora_B, kMultiOp, "lora_B", x, "x");
  TORCH_CHECK_TYPE(at::isFloatingType(scalings.scalar_type()), kMultiOp,
                   ": scalings must be a floating-point tensor; got ", scalings.scalar_type());
  TORCH_CHECK_VALUE(scalings.device() == x.device(), kMultiOp, ": scalings is on ", scalings.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 && lora_A.size(2) == n_in, kMultiOp,
                    ": lora_A must have shape [L, r, in_features] with in_features = ", n_in, "; got ", lora_A.sizes());
  const int64_t L = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == L && lora_B.size(1) == n_out && lora_B.size(2) == r,
                    kMultiOp, ": lora_B must have shape [L, out_features, r] = [", L, ", ", n_out, ", ", r, "]; got ",
                    lora_B.sizes());
  TORCH_CHECK_VALUE(scalings.dim() == 1 && scalings.size(0) == L, kMultiOp, ": scalings must have shape [L] = [", L,
                    "]; got ", scalings.sizes());
  TORCH_CHECK_VALUE(n_in <= INT32_MAX && n_out <= INT32_MAX && L < INT32_MAX, kMultiOp,
                    ": in/out features and the adapter count L (lora_A.shape[0]) must fit in 32 bits; got ", n_in, ", ",
                    n_out, ", ", L);
  // In capture, ids >= L act as -1; the backward skips the host read its forward already did.
  check_ids(kMultiOp, "adapter_ids", ids, rows, "tokens", x, "x", -1, L, "[-1, L)", check_id_values);
  return {rows, n_in, n_out, r, L};
}

at::Tensor multi_composite_forward(const at::Tensor& x2, at::Tensor out, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, const at::Tensor& ids, const at::Tensor& scalings) {
  const auto mt = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = scalings.to(mt);
  for_each_adapter(ids, lora_A.size(0), capturing(x2), [&](int64_t l, const AdapterRows& rows) {
    const at::Tensor u = rows.gather(x2).to(mt).mm(lora_A[l].to(mt).t());
    rows.add_into(out, (u.mm(lora_B[l].to(mt).t()) * s[l]).to(out.scalar_type()));
  });
  return out;
}

at::Tensor lora_multi_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                              const at::Tensor& scalings) {
  const MultiDims dims = check_multi(x, weight, bias, lora_A, lora_B, ids, scalings, true);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  at::Tensor out = base_product(x2, weight, bias);
#ifdef PEFTKERN_WITH_CUDA
  if (lowrank_fused(x, dims.r) && dims.rows > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    const SegmentTensors groups(ids, dims.adapters, /*copy_rest=*/false);  // res is y: rows of no adapter stay
    const at::Tensor scales = scalings.to(at::kFloat).contiguous();
    const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
    // scale 1: each adapter's scaling comes from segments.scales
    auto args = lowrank_args<kernels::LowRankForwardArgs>(x, Activation::kIdentity, 1.0, dims.rows, dims.n_in,
                                                          dims.n_out, dims.r);
    args.x = x2.data_ptr();
    args.w_down = a.data_ptr();
    args.w_up = b.data_ptr();
    args.res = args.y = out.data_ptr();
    args.segments = groups.segments();
    args.segments.w_down_stride = dims.r * dims.n_in;
    args.segments.w_up_stride = dims.n_out * dims.r;
    args.segments.scales = scales.data_ptr<float>();
    C10_CUDA_CHECK(kernels::lowrank_forward(args, at::cuda::getCurrentCUDAStream()));
    return out.view(with_last(x.sizes(), dims.n_out));
  }
#endif
  return multi_composite_forward(x2, out, lora_A, lora_B, ids, scalings).view(with_last(x.sizes(), dims.n_out));
}

Grads5 lora_multi_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                           const at::Tensor& scalings, std::array<bool, 5> need) {
  const MultiDims dims = check_multi(x, weight, std::nullopt, lora_A, lora_B, ids, scalings, false);
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const auto dt = x.scalar_type();
  const auto mt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out}).to(mt);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor dx = need_dx ? g2.mm(weight.to(mt)) : at::Tensor();
  at::Tensor dw = need_dw ? g2.t().mm(x2.to(mt)).to(dt) : at::Tensor();
  at::Tensor db = need_db ? g2.sum(0).to(dt) : at::Tensor();
  at::Tensor dA = need_dA ? at::zeros(lora_A.sizes(), lora_A.options().dtype(mt)) : at::Tensor();
  at::Tensor dB = need_dB ? at::zeros(lora_B.sizes(), lora_B.options().dtype(mt)) : at::Tensor();
  if (need_dx || need_dA || need_dB) {
    const at::Tensor s = scalings.to(mt);
    for_each_adapter(ids, dims.adapters, capturing(x), [&](int64_t l, const AdapterRows& rows) {
      const at::Tensor xl = rows.gather(x2).to(mt), gl = rows.gather(g2);
      const at::Tensor a = lora_A[l].to(mt), b = lora_B[l].to(mt);
      const at::Tensor v = rows.keep(gl.mm(b)) * s[l];  // scaling * grad_out @ lora_B   [count, r]
      if (need_dx) rows.add_into(dx, v.mm(a));
      if (need_dA) dA[l].copy_(v.t().mm(xl));
      if (need_dB) dB[l].copy_(gl.t().mm(rows.keep(xl.mm(a.t()))) * s[l]);
    });
  }
  auto cast = [dt](const at::Tensor& t) { return t.defined() ? t.to(dt) : t; };
  return {need_dx ? std::optional<at::Tensor>(cast(dx).view(x.sizes())) : std::nullopt, defined_or_none(dw),
          defined_or_none(db), defined_or_none(cast(dA)), defined_or_none(cast(dB))};
}

void register_impls(torch::Library& m) {
  m.impl("lora_linear_multi_forward", fresh_outputs<&lora_multi_forward>);
  m.impl("lora_linear_multi_backward", fresh_outputs<&lora_multi_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
