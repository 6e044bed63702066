// peftkern::adapter_multi_forward / adapter_multi_backward (L bottleneck adapters, each token its
// own): out[t] = res[t] + scale * (act(x[t] @ w_down[i]^T + b_down[i]) @ w_up[i]^T + b_up[i]) with
// i = adapter_ids[t] (i = -1: out[t] = res[t]); res = residual or x. CUDA forward: tokens grouped by
// adapter on the device, then the fused low-rank kernel of kernels/lowrank.h with one adapter per
// 64-token block (the rows of no adapter copied by their own blocks). CPU, the backward, and CUDA
// float64 or r > 256: a per-adapter composite (see ops/multi_adapter.h for its host read).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/lowrank.h"
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

constexpr const char* kOp = "adapter_multi";

struct Dims {
  int64_t rows, d, r, adapters;
};

// check_id_values: read the ids' range on the host (the forward; the backward reuses its check).
Dims check_multi(const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                 const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& ids,
                 const std::optional<at::Tensor>& residual, bool check_id_values) {
  check_floating(x, kOp, "x");
  check_like(w_down, kOp, "w_down", x, "x");
  check_like(b_down, kOp, "b_down", x, "x");
  check_like(w_up, kOp, "w_up", x, "x");
  check_like(b_up, kOp, "b_up", x, "x");
  check_like(residual, kOp, "residual", x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, kOp, ": x must have shape [..., d] with d >= 1; got ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) >= 1 && w_down.size(1) >= 1 && w_down.size(2) == d, kOp,
                    ": w_down must have shape [L, r, d] with L >= 1, r >= 1 and d = ", d, " (x's last dimension); got ",
                    w_down.sizes());
  const int64_t L = w_down.size(0), r = w_down.size(1);
  TORCH_CHECK_VALUE(w_up.dim() == 3 && w_up.size(0) == L && w_up.size(1) == d && w_up.size(2) == r, kOp,
                    ": w_up must have shape [L, d, r] = [", L, ", ", d, ", ", r, "]; got ", w_up.sizes());
  TORCH_CHECK_VALUE(!b_down || (b_down->dim() == 2 && b_down->size(0) == L && b_down->size(1) == r), kOp,
                    ": b_down must have shape [L, r] = [", L, ", ", r, "]; got ",
                    b_down ? b_down->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!b_up || (b_up->dim() == 2 && b_up->size(0) == L && b_up->size(1) == d), kOp,
                    ": b_up must have shape [L, d] = [", L, ", ", d, "]; got ", b_up ? b_up->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!residual || residual->sizes() == x.sizes(), kOp, ": residual must have x's shape ", x.sizes(),
                    "; got ", residual ? residual->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(d <= INT32_MAX && r <= INT32_MAX && L < INT32_MAX, kOp,
                    ": d, r and the adapter count L must fit in 32 bits; got ", d, ", ", r, ", ", L);
  const int64_t rows = x.numel() / d;
  // In capture, ids >= L act as -1 (no adapter).
  check_ids(kOp, "adapter_ids", ids, rows, "tokens", x, "x", -1, L, "[-1, L)", check_id_values);
  return {rows, d, r, L};
}

// Per-adapter composite: out rows of adapter l computed on its gathered rows, the others keep res.
std::tuple<at::Tensor, at::Tensor> forward_composite(const at::Tensor& x2, const at::Tensor& res2, const Dims& dims,
                                                     const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                                     const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                     const at::Tensor& ids, Activation act, double scale, bool save) {
  at::Tensor out = res2.clone(at::MemoryFormat::Contiguous);
  at::Tensor z = save ? at::zeros({dims.rows, dims.r}, x2.options()) : at::empty({0}, x2.options());
  for_each_adapter(ids, dims.adapters, capturing(x2), [&](int64_t l, const AdapterRows& rows) {
    std::optional<at::Tensor> bd, bu;
    if (b_down) bd = (*b_down)[l];
    if (b_up) bu = (*b_up)[l];
    auto [o, zl] = cpu::lowrank_forward(rows.gather(x2), w_down[l], bd, w_up[l], bu, rows.gather(res2), act, scale,
                                        save);
    rows.copy_into(out, o);
    if (save) rows.copy_into(z, zl);
  });
  return {out, z};
}

#ifdef PEFTKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> forward_fused(const at::Tensor& x2, const at::Tensor& res2, const Dims& dims,
                                                 const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                                 const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                 const at::Tensor& ids, Activation act, double scale, bool save) {
  const c10::cuda::CUDAGuard guard(x2.device());
  const SegmentTensors groups(ids, dims.adapters, /*copy_rest=*/true);  // rows of no adapter: out = res
  const at::Tensor wd = w_down.contiguous(), wu = w_up.contiguous();
  const std::optional<at::Tensor> bd = b_down ? std::optional<at::Tensor>(b_down->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bu = b_up ? std::optional<at::Tensor>(b_up->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({dims.rows, dims.d}, x2.options());
  // the kernel writes z for the rows of an adapter only; the others read as 0
  at::Tensor z = save ? at::zeros({dims.rows, dims.r}, x2.options()) : at::empty({0}, x2.options());

  auto args = lowrank_args<kernels::LowRankForwardArgs>(x2, act, scale, dims.rows, dims.d, dims.d, dims.r);
  args.x = x2.data_ptr();
  args.w_down = wd.data_ptr();
  args.b_down = data_or_null(bd);
  args.w_up = wu.data_ptr();
  args.b_up = data_or_null(bu);
  args.res = res2.data_ptr();
  args.y = out.data_ptr();
  args.z = save ? z.data_ptr() : nullptr;
  args.segments = groups.segments();
  args.segments.w_down_stride = dims.r * dims.d;
  args.segments.w_up_stride = dims.d * dims.r;
  args.segments.b_down_stride = dims.r;
  args.segments.b_up_stride = dims.d;
  C10_CUDA_CHECK(kernels::lowrank_forward(args, at::cuda::getCurrentCUDAStream()));
  return {out, z};
}
#endif

std::tuple<at::Tensor, at::Tensor> adapter_multi_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                         const std::optional<at::Tensor>& b_down,
                                                         const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                         const at::Tensor& ids,
                                                         const std::optional<at::Tensor>& residual,
                                                         c10::string_view activation, double scale, bool save) {
  const Dims dims = check_multi(x, w_down, b_down, w_up, b_up, ids, residual, true);
  const Activation act = parse_activation(kOp, activation);
  const at::Tensor x2 = x.reshape({dims.rows, dims.d}).contiguous();
  const at::Tensor res2 = residual ? residual->reshape({dims.rows, dims.d}).contiguous() : x2;
  at::Tensor out, z;
#ifdef PEFTKERN_WITH_CUDA
  if (lowrank_fused(x, dims.r) && dims.rows > 0)
    std::tie(out, z) = forward_fused(x2, res2, dims, w_down, b_down, w_up, b_up, ids, act, scale, save);
#endif
  if (!out.defined())
    std::tie(out, z) = forward_composite(x2, res2, dims, w_down, b_down, w_up, b_up, ids, act, scale, save);
  return {out.view(x.sizes()), save ? z.view(with_last(x.sizes(), dims.r)) : z};
}

// Per adapter l on its rows: dh = scale * g @ w_up[l], dz = dh * act'(z); dx = dz @ w_down[l]
// (+ g when the residual was x); dw_down[l] = dz^T x, db_down[l] = sum dz, dw_up[l] = scale * g^T act(z),
// db_up[l] = scale * sum g. Math in float32 (float64 for float64); cuBLAS on CUDA.
Grads5 adapter_multi_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z,
                              const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& ids,
                              c10::string_view activation, double scale, bool residual_is_x, std::array<bool, 5> need) {
  const Dims dims = check_multi(x, w_down, std::nullopt, w_up, std::nullopt, ids, std::nullopt, false);
  check_like(grad_out, "adapter_multi_backward", "grad_out", x, "x");
  check_like(z, "adapter_multi_backward", "bottleneck", x, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "adapter_multi_backward: grad_out must have x's shape ", x.sizes(),
                    "; got ", grad_out.sizes());
  TORCH_CHECK_VALUE(z.numel() == dims.rows * dims.r, "adapter_multi_backward: bottleneck must hold [rows, r] = [",
                    dims.rows, ", ", dims.r, "] values (the forward ran with save_bottleneck=False?); got ", z.sizes());
  const Activation act = parse_activation(kOp, activation);
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu] = need;
  const auto dt = x.scalar_type();
  const auto mt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t L = dims.adapters;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.d}).to(mt);
  const at::Tensor x2 = x.reshape({dims.rows, dims.d});
  const at::Tensor z2 = z.reshape({dims.rows, dims.r});
  const auto opts = x.options().dtype(mt);
  at::Tensor dx = need_dx ? (residual_is_x ? g2.clone() : at::zeros({dims.rows, dims.d}, opts)) : at::Tensor();
  at::Tensor dwd = need_dwd ? at::zeros({L, dims.r, dims.d}, opts) : at::Tensor();
  at::Tensor dbd = need_dbd ? at::zeros({L, dims.r}, opts) : at::Tensor();
  at::Tensor dwu = need_dwu ? at::zeros({L, dims.d, dims.r}, opts) : at::Tensor();
  at::Tensor dbu = need_dbu ? at::zeros({L, dims.d}, opts) : at::Tensor();
  if (need_dx || need_dwd || need_dbd || need_dwu || need_dbu) {
    for_each_adapter(ids, L, capturing(x), [&](int64_t l, const AdapterRows& rows) {
      const at::Tensor gl = rows.gather(g2), zl = rows.gather(z2).to(mt);
      if (need_dwu) dwu[l].copy_(gl.t().mm(rows.keep(cpu::activate(zl, act))).mul_(scale));
      if (need_dbu) dbu[l].copy_(gl.sum(0).mul_(scale));
      if (!(need_dx || need_dwd || need_dbd)) return;
      const at::Tensor dh = rows.keep(gl.mm(w_up[l].to(mt))).mul_(scale);
      const at::Tensor dz = rows.keep(cpu::activate_backward(dh, zl, act));
      if (need_dx) rows.add_into(dx, dz.mm(w_down[l].to(mt)));
      if (need_dwd) dwd[l].copy_(dz.t().mm(rows.gather(x2).to(mt)));
      if (need_dbd) dbd[l].copy_(dz.sum(0));
    });
  }
  auto cast = [dt](const at::Tensor& t) { return t.defined() ? defined_or_none(t.to(dt)) : std::nullopt; };
  return {need_dx ? std::optional<at::Tensor>(dx.to(dt).view(x.sizes())) : std::nullopt, cast(dwd), cast(dbd),
          cast(dwu), cast(dbu)};
}

void register_impls(torch::Library& m) {
  m.impl("adapter_multi_forward", fresh_outputs<&adapter_multi_forward>);
  m.impl("adapter_multi_backward", fresh_outputs<&adapter_multi_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
