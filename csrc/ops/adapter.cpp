// peftkern::adapter_forward / adapter_backward: checks, then the fused CUDA kernels of
// kernels/lowrank.h where they apply, else the composite of cpu/lowrank.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/lowrank.h"
#include "ops/common.h"
#include "ops/lowrank.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "adapter";

struct Dims {
  int64_t rows, d, r;
};

Dims check_forward(const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                   const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                   const std::optional<at::Tensor>& residual) {
  check_floating(x, kOp, "x");
  check_like(w_down, kOp, "w_down", x, "x");
  check_like(b_down, kOp, "b_down", x, "x");
  check_like(w_up, kOp, "w_up", x, "x");
  check_like(b_up, kOp, "b_up", x, "x");
  check_like(residual, kOp, "residual", x, "x");

  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, kOp, ": x must have shape [..., d] with d >= 1; got ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK_VALUE(w_down.dim() == 2 && w_down.size(1) == d, kOp, ": w_down must have shape [r, d] with d = ", d,
                    " (x's last dimension); got ", w_down.sizes());
  const int64_t r = w_down.size(0);
  TORCH_CHECK_VALUE(r >= 1, kOp, ": the bottleneck size r = w_down.shape[0] must be at least 1; got ", w_down.sizes());
  TORCH_CHECK_VALUE(w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == r, kOp, ": w_up must have shape [d, r] = [",
                    d, ", ", r, "]; got ", w_up.sizes());
  TORCH_CHECK_VALUE(!b_down || (b_down->dim() == 1 && b_down->size(0) == r), kOp, ": b_down must have shape [r] = [", r,
                    "]; got ", b_down ? b_down->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!b_up || (b_up->dim() == 1 && b_up->size(0) == d), kOp, ": b_up must have shape [d] = [", d,
                    "]; got ", b_up ? b_up->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!residual || residual->sizes() == x.sizes(), kOp, ": residual must have x's shape ", x.sizes(),
                    "; got ", residual ? residual->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(d <= INT32_MAX && r <= INT32_MAX, kOp, ": d and r must fit in 32 bits");
  return {x.numel() / d, d, r};
}

void check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
                    const at::Tensor& w_up) {
  const Dims dims = check_forward(x, w_down, std::nullopt, w_up, std::nullopt, std::nullopt);
  check_like(grad_out, "adapter_backward", "grad_out", x, "x");
  check_like(z, "adapter_backward", "bottleneck", x, "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "adapter_backward: grad_out must have x's shape ", x.sizes(),
                    "; got ", grad_out.sizes());
  TORCH_CHECK_VALUE(z.numel() == dims.rows * dims.r, "adapter_backward: bottleneck must hold [rows, r] = [", dims.rows,
                    ", ", dims.r, "] values (the forward ran with save_bottleneck=False?); got ", z.sizes());
}

std::tuple<at::Tensor, at::Tensor> forward_composite(const at::Tensor& x, const Dims& dims, const at::Tensor& w_down,
                                                     const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                     const std::optional<at::Tensor>& b_up,
                                                     const std::optional<at::Tensor>& residual, Activation act,
                                                     double scale, bool save, const std::optional<at::Tensor>& gate) {
  std::optional<at::Tensor> res2;
  if (residual) res2 = residual->reshape({dims.rows, dims.d});
  auto [out, z] =
      cpu::lowrank_forward(x.reshape({dims.rows, dims.d}), w_down, b_down, w_up, b_up, res2, act, scale, save, gate);
  return {out.view(x.sizes()), save ? z.view(with_last(x.sizes(), dims.r)) : z};
}

Grads6 backward_composite(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const Dims& dims,
                          const at::Tensor& w_down, const at::Tensor& w_up, Activation act, double scale,
                          bool residual_is_x, std::array<bool, 5> mask, const std::optional<at::Tensor>& gate,
                          const std::optional<at::Tensor>& b_up, bool need_dgate) {
  at::Tensor dgate;
  auto [dx, dwd, dbd, dwu, dbu] = cpu::lowrank_backward(
      grad_out.reshape({dims.rows, dims.d}), x.reshape({dims.rows, dims.d}), z.reshape({dims.rows, dims.r}), w_down,
      w_up, act, scale, residual_is_x, mask, gate, b_up, need_dgate ? &dgate : nullptr);
  return {dx.defined() ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt,
          defined_or_none(dwd),
          defined_or_none(dbd),
          defined_or_none(dwu),
          defined_or_none(dbu),
          dgate.defined() ? std::optional<at::Tensor>(dgate.view(x.sizes().slice(0, x.dim() - 1))) : std::nullopt};
}

// ------------------------------------------------------------------ fused CUDA kernels

#ifdef PEFTKERN_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> forward_fused(const at::Tensor& x, const Dims& dims, const at::Tensor& w_down,
                                                 const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                 const std::optional<at::Tensor>& b_up,
                                                 const std::optional<at::Tensor>& residual, Activation act,
                                                 double scale, bool save, const std::optional<at::Tensor>& gate) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({dims.rows, dims.d}).contiguous();
  const at::Tensor wd = w_down.contiguous(), wu = w_up.contiguous();
  const std::optional<at::Tensor> bd = b_down ? std::optional<at::Tensor>(b_down->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bu = b_up ? std::optional<at::Tensor>(b_up->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> res =
      residual ? std::optional<at::Tensor>(residual->reshape({dims.rows, dims.d}).contiguous()) : std::nullopt;
  at::Tensor out = at::empty({dims.rows, dims.d}, x.options());
  at::Tensor z = save ? at::empty({dims.rows, dims.r}, x.options()) : at::empty({0}, x.options());

  auto args = lowrank_args<kernels::LowRankForwardArgs>(x, act, scale, dims.rows, dims.d, dims.d, dims.r);
  args.x = x2.data_ptr();
  args.w_down = wd.data_ptr();
  args.b_down = data_or_null(bd);
  args.w_up = wu.data_ptr();
  args.b_up = data_or_null(bu);
  args.res = res ? res->data_ptr() : x2.data_ptr();
  args.y = out.data_ptr();
  args.z = save ? z.data_ptr() : nullptr;
  args.gate = data_or_null(gate);
  C10_CUDA_CHECK(kernels::lowrank_forward(args, at::cuda::getCurrentCUDAStream()));
  return {out.view(x.sizes()), save ? z.view(with_last(x.sizes(), dims.r)) : z};
}

Grads6 backward_fused(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const Dims& dims,
                      const at::Tensor& w_down, const at::Tensor& w_up, Activation act, double scale,
                      bool residual_is_x, std::array<bool, 5> mask, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& b_up, bool need_dgate) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.reshape({dims.rows, dims.d}).contiguous();
  const at::Tensor x2 = x.reshape({dims.rows, dims.d}).contiguous();
  const at::Tensor z2 = z.reshape({dims.rows, dims.r}).contiguous();
  const at::Tensor wd = w_down.contiguous(), wu = w_up.contiguous();
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu] = mask;
  const auto opts = x.options();
  at::Tensor dx = need_dx ? at::empty({dims.rows, dims.d}, opts) : at::Tensor();
  at::Tensor dwd = need_dwd ? at::empty({dims.r, dims.d}, opts) : at::Tensor();
  at::Tensor dbd = need_dbd ? at::empty({dims.r}, opts) : at::Tensor();
  at::Tensor dwu = need_dwu ? at::empty({dims.d, dims.r}, opts) : at::Tensor();
  at::Tensor dbu = need_dbu ? at::empty({dims.d}, opts) : at::Tensor();
  at::Tensor dgate = need_dgate ? at::empty({dims.rows}, opts.dtype(at::kFloat)) : at::Tensor();
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };

  auto args = lowrank_args<kernels::LowRankBackwardArgs>(x, act, scale, dims.rows, dims.d, dims.d, dims.r);
  args.grad_out = g.data_ptr();
  args.x = x2.data_ptr();
  args.z = z2.data_ptr();
  args.w_down = wd.data_ptr();
  args.w_up = wu.data_ptr();
  args.dx_mode = residual_is_x ? kernels::DxMode::kWritePlusGradOut : kernels::DxMode::kWrite;
  args.dx = ptr(dx);
  args.dw_down = ptr(dwd);
  args.db_down = ptr(dbd);
  args.dw_up = ptr(dwu);
  args.db_up = ptr(dbu);
  args.gate = data_or_null(gate);
  args.dgate = need_dgate ? dgate.data_ptr<float>() : nullptr;
  args.workspace_bytes = kernels::lowrank_backward_workspace_bytes(args);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(args.workspace_bytes)}, opts.dtype(at::kByte));
  args.workspace = args.workspace_bytes ? workspace.data_ptr() : nullptr;
  C10_CUDA_CHECK(kernels::lowrank_backward(args, at::cuda::getCurrentCUDAStream()));
  if (need_dgate) {  // the bias term of d out / d g (cuBLAS), then x's dtype
    if (b_up) dgate.add_(at::mv(g, b_up->contiguous()).to(at::kFloat), scale);
    dgate = dgate.to(x.scalar_type()).view(x.sizes().slice(0, x.dim() - 1));
  }
  return {need_dx ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt,
          defined_or_none(dwd),
          defined_or_none(dbd),
          defined_or_none(dwu),
          defined_or_none(dbu),
          defined_or_none(dgate)};
}

#endif  // PEFTKERN_WITH_CUDA

// ------------------------------------------------------------------ the ops

std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual,
                                                   c10::string_view activation, double scale, bool save,
                                                   const std::optional<at::Tensor>& gate) {
  const Dims dims = check_forward(x, w_down, b_down, w_up, b_up, residual);
  const Activation act = parse_activation(kOp, activation);
  const auto g = check_gate(kOp, gate, x);
#ifdef PEFTKERN_WITH_CUDA
  if (lowrank_fused(x, dims.r))
    return forward_fused(x, dims, w_down, b_down, w_up, b_up, residual, act, scale, save, g);
#endif
  return forward_composite(x, dims, w_down, b_down, w_up, b_up, residual, act, scale, save, g);
}

Grads6 adapter_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
                        const at::Tensor& w_up, c10::string_view activation, double scale, bool residual_is_x,
                        std::array<bool, 5> mask, const std::optional<at::Tensor>& gate,
                        const std::optional<at::Tensor>& b_up, bool gate_grad) {
  check_backward(grad_out, x, z, w_down, w_up);
  const Dims dims{x.numel() / x.size(-1), x.size(-1), w_down.size(0)};
  const Activation act = parse_activation(kOp, activation);
  const auto g = check_gate("adapter_backward", gate, x);
  check_like(b_up, "adapter_backward", "b_up", x, "x");
  TORCH_CHECK_VALUE(!b_up || (b_up->dim() == 1 && b_up->size(0) == dims.d),
                    "adapter_backward: b_up must have shape [d] = [", dims.d, "]");
  TORCH_CHECK_VALUE(!gate_grad || g, "adapter_backward: gate_grad needs the forward's gate");
#ifdef PEFTKERN_WITH_CUDA
  if (lowrank_fused(x, dims.r))
    return backward_fused(grad_out, x, z, dims, w_down, w_up, act, scale, residual_is_x, mask, g, b_up, gate_grad);
#endif
  return backward_composite(grad_out, x, z, dims, w_down, w_up, act, scale, residual_is_x, mask, g, b_up, gate_grad);
}

void register_impls(torch::Library& m) {
  m.impl("adapter_forward", fresh_outputs<&adapter_forward>);
  m.impl("adapter_backward", fresh_outputs<&adapter_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
