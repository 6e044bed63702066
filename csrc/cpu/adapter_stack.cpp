#include "cpu/adapter_stack.h"

#include <ATen/ATen.h>

#include "cpu/lowrank.h"

namespace peftkern::cpu {
namespace {

// The products' dtype: x's on CUDA (cuBLAS accumulates in float32), float32 or float64 on the CPU.
at::ScalarType product_dtype(const at::Tensor& x) {
  if (x.scalar_type() == at::kDouble) return at::kDouble;
  return x.is_cuda() ? x.scalar_type() : at::kFloat;
}

// The element-wise math's dtype.
at::ScalarType math_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_stack_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                         const std::optional<at::Tensor>& b_down,
                                                         const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                         Activation activation, double scale, bool save_z) {
  const int64_t rows = x.size(0), d = x.size(1), N = w_down.size(0), r = w_down.size(1);
  const auto pt = product_dtype(x), mt = math_dtype(x);
  const at::Tensor xp = x.to(pt);
  const at::Tensor wd = w_down.reshape({N * r, d}).to(pt);
  const at::Tensor z = b_down ? at::addmm(b_down->reshape({N * r}).to(pt), xp, wd.t()) : at::mm(xp, wd.t());
  // [N, rows, r] view of act(z)
  const at::Tensor h = activate(z.to(mt), activation).to(pt).view({rows, N, r}).transpose(0, 1);
  const at::Tensor wu_t = w_up.to(pt).transpose(1, 2);  // [N, r, d]
  at::Tensor out = at::empty({rows, N, d}, x.options().dtype(pt));
  at::Tensor out_n = out.transpose(0, 1);  // [N, rows, d] view: adapter n writes out[:, n]
  if (b_up)
    at::baddbmm_out(out_n, b_up->to(pt).unsqueeze(1).expand({N, rows, d}), h, wu_t, scale, scale);
  else
    at::bmm_out(out_n, h, wu_t).mul_(scale);
  const auto dt = x.scalar_type();
  return {out.to(dt), save_z ? z.to(dt).view({rows, N, r}) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_stack_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, Activation activation, double scale, std::array<bool, 5> mask) {
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu] = mask;
  const int64_t rows = x.size(0), d = x.size(1), N = w_down.size(0), r = w_down.size(1);
  const auto pt = product_dtype(x), mt = math_dtype(x), dt = x.scalar_type();
  const at::Tensor g = grad_out.to(pt);  // [rows, N, d]
  const at::Tensor g_n = g.transpose(0, 1);  // [N, rows, d] view
  const at::Tensor zm = z.reshape({rows, N * r}).to(mt);
  at::Tensor dx, dwd, dbd, dwu, dbu;
  if (need_dwu) {  // dw_up[n] = scale * g[:, n]^T act(z[:, n])
    const at::Tensor h = activate(zm, activation).to(pt).view({rows, N, r}).transpose(0, 1);  // [N, rows, r]
    dwu = at::bmm(g_n.transpose(1, 2), h).mul_(scale).to(dt);
  }
  if (need_dbu) dbu = at::sum(g, {0}, false, mt).mul_(scale).to(dt);
  if (need_dx || need_dwd || need_dbd) {
    // dz[:, n] = scale * (g[:, n] @ w_up[n]) * act'(z[:, n]), laid out [rows, N * r] like z
    const at::Tensor dh = at::bmm(g_n, w_up.to(pt)).transpose(0, 1).reshape({rows, N * r}).to(mt).mul_(scale);
    const at::Tensor dz = activate_backward(dh, zm, activation);
    const at::Tensor dzp = dz.to(pt);
    if (need_dx) dx = at::mm(dzp, w_down.reshape({N * r, d}).to(pt)).to(dt);
    if (need_dwd) dwd = at::mm(dzp.t(), x.to(pt)).view({N, r, d}).to(dt);
    if (need_dbd) dbd = dz.sum(0).view({N, r}).to(dt);
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace peftkern::cpu
