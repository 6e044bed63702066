#include "cpu/lowrank.h"

#include <ATen/ATen.h>

namespace peftkern::cpu {
namespace {

at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor activate(const at::Tensor& z, Activation a) {
  switch (a) {
    case Activation::kGelu: return at::gelu(z, "none");
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kRelu: return at::relu(z);
    case Activation::kSilu: return at::silu(z);
    case Activation::kIdentity: return z;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

at::Tensor activate_backward(const at::Tensor& grad, const at::Tensor& z, Activation a) {
  switch (a) {
    case Activation::kGelu: return at::gelu_backward(grad, z, "none");
    case Activation::kGeluTanh: return at::gelu_backward(grad, z, "tanh");
    case Activation::kRelu: return at::threshold_backward(grad, z, 0);
    case Activation::kSilu: return at::silu_backward(grad, z);
    case Activation::kIdentity: return grad;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

std::tuple<at::Tensor, at::Tensor> lowrank_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual, Activation activation,
                                                   double scale, bool save_z, const std::optional<at::Tensor>& gate) {
  const auto mt = math_dtype(x.scalar_type());
  const at::Tensor xm = x.to(mt);
  at::Tensor z = at::matmul(xm, w_down.to(mt).t());
  if (b_down) z.add_(b_down->to(mt));
  at::Tensor y = at::matmul(activate(z, activation), w_up.to(mt).t());
  if (b_up) y.add_(b_up->to(mt));
  if (gate) y.mul_(gate->to(mt).reshape({-1, 1}));
  const at::Tensor res = residual ? residual->to(mt) : xm;
  at::Tensor out = res.add(y, scale).to(x.scalar_type());
  return {out, save_z ? z.to(x.scalar_type()) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, Activation activation, double scale, bool grad_out_into_dx, std::array<bool, 5> mask,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& b_up, at::Tensor* dgate) {
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu] = mask;
  const auto dt = x.scalar_type();
  const auto mt = math_dtype(dt);
  const at::Tensor g = grad_out.to(mt);
  const at::Tensor zm = z.to(mt);
  const at::Tensor gm = gate ? gate->to(mt).reshape({-1, 1}) : at::Tensor();  // [rows, 1]
  at::Tensor dx, dwd, dbd, dwu, dbu;

  if (need_dwu || dgate) {
    const at::Tensor h = activate(zm, activation);
    if (need_dwu) dwu = at::matmul(g.t(), gm.defined() ? h * gm : h).mul_(scale).to(dt);
    if (dgate) {  // d out / d g = scale * (act(z) @ w_up^T + b_up), dotted with grad_out per row
      at::Tensor dg = (at::matmul(g, w_up.to(mt)) * h).sum(1);
      if (b_up) dg.add_(at::mv(g, b_up->to(mt)));
      *dgate = dg.mul_(scale).to(dt);
    }
  }
  if (need_dbu) dbu = (gm.defined() ? at::mv(g.t(), gm.reshape({-1})) : g.sum(0)).mul_(scale).to(dt);
  if (need_dx || need_dwd || need_dbd) {
    at::Tensor dh = at::matmul(g, w_up.to(mt)).mul_(scale);
    if (gm.defined()) dh.mul_(gm);
    const at::Tensor dz = activate_backward(dh, zm, activation);
    if (need_dx) {
      at::Tensor dxm = at::matmul(dz, w_down.to(mt));
      if (grad_out_into_dx) dxm.add_(g);
      dx = dxm.to(dt);
    }
    if (need_dwd) dwd = at::matmul(dz.t(), x.to(mt)).to(dt);
    if (need_dbd) dbd = dz.sum(0).to(dt);
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace peftkern::cpu
