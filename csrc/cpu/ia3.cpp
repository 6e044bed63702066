#include "cpu/ia3.h"

#include <ATen/ATen.h>

#include <cfloat>

namespace peftkern::cpu {
namespace {

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// sum over rows of a * b, accumulated in float32 (float64), in a's dtype
at::Tensor column_dot(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = acc_type(a);
  return (a.to(acc) * b.to(acc)).sum(0).to(a.scalar_type());
}

}  // namespace

bool ia3_fold_weight(int64_t rows, int64_t n_in, int64_t n_out, bool scale_input) {
  // fold: read + write [out, in]; scale: read + write [rows, out] (output) or [rows, in] (input)
  return scale_input ? n_out * n_in < rows * n_in : n_out * n_in < rows * n_out;
}

at::Tensor ia3_forward(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& scale, bool scale_input) {
  const int64_t rows = x2.size(0), n_in = weight.size(1), n_out = weight.size(0);
  const bool fold = ia3_fold_weight(rows, n_in, n_out, scale_input);
  if (scale_input) {
    if (fold) {
      const at::Tensor w = weight * scale.unsqueeze(0);
      return bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    }
    const at::Tensor xs = x2 * scale;
    return bias ? at::addmm(*bias, xs, weight.t()) : at::mm(xs, weight.t());
  }
  if (fold) {  // the GEMM's output rows come out scaled
    const at::Tensor w = weight * scale.unsqueeze(1);
    return bias ? at::addmm(*bias * scale, x2, w.t()) : at::mm(x2, w.t());
  }
  at::Tensor out = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  return out.mul_(scale);
}

at::Tensor ia3_output_grad_x(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& scale) {
  const int64_t rows = g2.size(0), n_in = weight.size(1), n_out = weight.size(0);
  // g @ (l W) reads [out, in] twice more; (g l) @ W reads and writes [rows, out]: same rule as the forward
  if (ia3_fold_weight(rows, n_in, n_out, false)) return at::mm(g2, weight * scale.unsqueeze(1));
  return at::mm(g2 * scale, weight);
}

double ia3_rescue_below(at::ScalarType dtype) {
  // below its dtype's smallest normal, out = l z keeps too few of z's digits for out / l
  switch (dtype) {
    case at::kHalf: return 6.103515625e-05;  // 2^-14
    case at::kDouble: return DBL_MIN;
    default: return FLT_MIN;
  }
}

at::Tensor ia3_output_scale_grad(const at::Tensor& out2, const at::Tensor& g2, const at::Tensor& x2,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& scale) {
  const auto acc = acc_type(out2);
  const at::Tensor l = scale.to(acc);
  // zero or tiny, inf or NaN: the kernels' predicate (rescued() in kernels/ia3.cu)
  const at::Tensor small = at::logical_or(at::logical_not(l.abs() >= ia3_rescue_below(scale.scalar_type())), l.isinf());
  at::Tensor grad = (out2.to(acc) * g2.to(acc)).sum(0) / at::where(small, at::ones_like(l), l);
  if (out2.is_cuda()) {  // float64 on CUDA (slow path): every column's z recomputed, no host read
    at::Tensor z = at::mm(x2.to(acc), weight.to(acc).t());
    if (bias) z = z + bias->to(acc);
    return at::where(small, (g2.to(acc) * z).sum(0), grad).to(scale.scalar_type());
  }
  if (small.any().item<bool>()) {
    const at::Tensor cols = small.nonzero().squeeze(1);
    const at::Tensor w = weight.index_select(0, cols).to(acc);
    at::Tensor z = at::mm(x2.to(acc), w.t());
    if (bias) z = z + bias->index_select(0, cols).to(acc);
    grad.index_copy_(0, cols, (g2.index_select(1, cols).to(acc) * z).sum(0));
  }
  return grad.to(scale.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ia3_input_scale_grads(const at::Tensor& grad_h, const at::Tensor& x2,
                                                         const at::Tensor& scale, bool need_dx, bool need_dl) {
  at::Tensor dx, dl;
  if (need_dl) dl = column_dot(grad_h, x2);
  if (need_dx) dx = grad_h * scale;
  return {dx, dl};
}

}  // namespace peftkern::cpu
