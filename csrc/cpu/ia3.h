// (IA)^3 by ATen ops (any device): the forward's folded or scaled product and the scale's gradients.
// peftkern's CPU path, float64 on CUDA, and the composite fallback of the CUDA kernels'
// (kernels/ia3.h) math. Inputs are 2-D, contiguous where it matters, and already checked; sums run in
// float32 (float64 for float64) and results take x's dtype.
//   output scale (l [out]):  out = l * (x @ W^T + b)        input scale (l [in]):  out = (l * x) @ W^T + b
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace peftkern::cpu {

// The forward, folding l into the weight's rows (output) or columns (input) when that moves fewer
// bytes than scaling the activation (fold: a pass over [out, in]; scale: one over [rows, out] or
// [rows, in]), which is exact either way.
at::Tensor ia3_forward(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& scale, bool scale_input);

// True when the [rows, ...] activation pass costs more bytes than the [out, in] weight pass.
bool ia3_fold_weight(int64_t rows, int64_t n_in, int64_t n_out, bool scale_input);

// grad_out @ (l[:, None] * W) for the output scale, folded or not by the same byte rule.
at::Tensor ia3_output_grad_x(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& scale);

// |l| below this and the output-scale gradient sum(out * g) / l loses its precision: those columns
// (and l = inf or NaN, where out / l is not z) are recomputed from x, W and b. The dtype's smallest
// normal (float16 2^-14; float32 and bfloat16 float32's; float64 its own): at |l| >= 2^-14 a float16
// out = l z rounds by at most 2^-25 (its subnormal spacing / 2), so out / l is off by <= 2^-11, the
// rounding of z itself; zeros and subnormal l are the rescued ones.
double ia3_rescue_below(at::ScalarType dtype);

// d l for the output scale: sum_t out[t] * g[t] / l, the rescued columns (|l| < ia3_rescue_below, inf, NaN) as
// sum_t g[t, j] * (x[t] . W[j] + b[j]).
at::Tensor ia3_output_scale_grad(const at::Tensor& out2, const at::Tensor& g2, const at::Tensor& x2,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& scale);

// Input scale from grad_h = g @ W: (grad_x = grad_h * l or undefined, d l = sum_t x[t] * grad_h[t]
// or undefined).
std::tuple<at::Tensor, at::Tensor> ia3_input_scale_grads(const at::Tensor& grad_h, const at::Tensor& x2,
                                                         const at::Tensor& scale, bool need_dx, bool need_dl);

}  // namespace peftkern::cpu
