// peftkern::ia3_linear_forward / ia3_linear_backward: (IA)^3's learned scale on a linear layer.
//   output scale (l [out]):  out = l * (x @ W^T + b)       input scale (l [in]):  out = (l * x) @ W^T + b
// Forward (every device): l folded into the weight for cuBLAS, or the activation scaled when the
// rows are few (cpu/ia3.h's byte rule). Backward on CUDA (float32/16/bf16): the products through
// cuBLAS and the scale's gradient by the column kernels of kernels/ia3.h (output scale: from the
// saved output, d l = sum_t out * g / l plus the exact recompute of the columns with l ~ 0; input
// scale: one pass over grad_h = g @ W and x writes grad_x = grad_h * l in place and d l). CPU and
// float64: the ATen composite of cpu/ia3.h, the same math.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "cpu/ia3.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/ia3.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "ia3_linear";

using Grads4 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>;

LinearDims check_ia3(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& scale, bool scale_input) {
  const LinearDims dims = check_linear(op, x, weight, bias);
  check_like(scale, op, "ia3_scale", x, "x");
  const int64_t n = scale_input ? dims.n_in : dims.n_out;
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == n, op, ": ia3_scale must have shape [", n, "] (",
                    scale_input ? "in_features, as scale_input=True scales the input" :
                                  "out_features, as scale_input=False scales the output",
                    "); got ", scale.sizes());
  return dims;
}

at::Tensor ia3_linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& ia3_scale, bool scale_input) {
  const LinearDims dims = check_ia3(kOp, x, weight, bias, ia3_scale, scale_input);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  return cpu::ia3_forward(x2, weight, bias, ia3_scale, scale_input).view(with_last(x.sizes(), dims.n_out));
}

#ifdef PEFTKERN_WITH_CUDA
bool kernel_dtype_ok(const at::Tensor& t) { return t.scalar_type() != at::kDouble; }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

// d l [out] for the output scale (rows > 0)
at::Tensor output_scale_grad(const at::Tensor& out2, const at::Tensor& g2, const at::Tensor& x2,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                             const LinearDims& dims) {
#ifdef PEFTKERN_WITH_CUDA
  if (x2.is_cuda() && kernel_dtype_ok(x2)) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor l = scale.contiguous();
    const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    const auto dtype = kernel_dtype(x2.scalar_type());  // checks before any allocation
    at::Tensor dl = at::empty({dims.n_out}, scale.options());
    const float rescue_below = static_cast<float>(cpu::ia3_rescue_below(x2.scalar_type()));
    kernels::IA3ColumnArgs a{};
    a.dtype = dtype;
    a.rows = dims.rows;
    a.cols = dims.n_out;
    a.num_sms = num_sms();
    const at::Tensor partials = at::empty({kernels::ia3_column_splits(a.rows, a.cols, a.num_sms), a.cols},
                                          x2.options().dtype(at::kFloat));
    a.a = out2.data_ptr();  // read only in this mode
    a.b = g2.data_ptr();
    a.scale = l.data_ptr();
    a.divide_by_scale = true;
    a.rescue_below = rescue_below;
    a.partials = partials.data_ptr<float>();
    a.grad_scale = dl.data_ptr();
    C10_CUDA_CHECK(kernels::ia3_column_grad(a, stream));
    kernels::IA3ZeroScaleArgs z{};
    z.dtype = a.dtype;
    z.rows = dims.rows;
    z.n_in = dims.n_in;
    z.n_out = dims.n_out;
    z.x = x2.data_ptr();
    z.weight = weight.data_ptr();  // strided: no copy of a tied or transposed weight
    z.w_row_stride = weight.stride(0);
    z.w_col_stride = weight.stride(1);
    const at::Tensor rescue_partials =
        at::empty({kernels::ia3_zero_scale_splits(dims.rows), dims.n_out}, x2.options().dtype(at::kFloat));
    z.partials = rescue_partials.data_ptr<float>();
    z.bias = data_or_null(b);
    z.grad_out = g2.data_ptr();
    z.scale = l.data_ptr();
    z.rescue_below = rescue_below;
    z.grad_scale = dl.data_ptr();
    C10_CUDA_CHECK(kernels::ia3_zero_scale_grad(z, stream));
    return dl;
  }
#endif
  (void)dims;
  return cpu::ia3_output_scale_grad(out2, g2, x2, weight, bias, scale);
}

// (grad_x [rows, in] or undefined, d l [in] or undefined) for the input scale (rows > 0)
std::tuple<at::Tensor, at::Tensor> input_scale_grads(const at::Tensor& g2, const at::Tensor& x2,
                                                     const at::Tensor& weight, const at::Tensor& scale,
                                                     const LinearDims& dims, bool need_dx, bool need_dl) {
  at::Tensor grad_h = at::mm(g2, weight);  // cuBLAS on CUDA
#ifdef PEFTKERN_WITH_CUDA
  if (x2.is_cuda() && kernel_dtype_ok(x2) && need_dl) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor l = scale.contiguous();
    at::Tensor dl = at::empty({dims.n_in}, scale.options());
    kernels::IA3ColumnArgs a{};
    a.dtype = kernel_dtype(x2.scalar_type());
    a.rows = dims.rows;
    a.cols = dims.n_in;
    a.num_sms = num_sms();
    const at::Tensor partials = at::empty({kernels::ia3_column_splits(a.rows, a.cols, a.num_sms), a.cols},
                                          x2.options().dtype(at::kFloat));
    a.a = grad_h.data_ptr();  // becomes grad_x = grad_h * l in place
    a.b = x2.data_ptr();
    a.scale = l.data_ptr();
    a.scale_a_in_place = true;
    a.partials = partials.data_ptr<float>();
    a.grad_scale = dl.data_ptr();
    C10_CUDA_CHECK(kernels::ia3_column_grad(a, stream));
    return {need_dx ? grad_h : at::Tensor(), dl};
  }
#endif
  (void)dims;
  return cpu::ia3_input_scale_grads(grad_h, x2, scale, need_dx, need_dl);
}

Grads4 ia3_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& ia3_scale, const at::Tensor& out,
                           bool scale_input, std::array<bool, 4> need) {
  constexpr const char* op = "ia3_linear_backward";
  const LinearDims dims = check_ia3(op, x, weight, bias, ia3_scale, scale_input);
  check_like(grad_out, op, "grad_out", x, "x");
  const auto out_shape = with_last(x.sizes(), dims.n_out);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), op, ": grad_out must have shape ",
                    at::IntArrayRef(out_shape), "; got ", grad_out.sizes());
  const auto [need_dx, need_dw, need_db, need_dl] = need;
  if (need_dl && !scale_input) {
    check_like(out, op, "out", x, "x");
    TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), op,
                      ": out must be the forward's output, shape ", at::IntArrayRef(out_shape), "; got ",
                      out.sizes());
  }
#ifdef PEFTKERN_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (x.is_cuda()) guard.emplace(x.device());
#endif
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out}).contiguous();
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  at::Tensor dx, dw, db, dl;
  if (scale_input) {
    if (need_dw) dw = at::mm(g2.t(), x2 * ia3_scale);
    if (need_db) db = g2.sum(0);
    if (dims.rows == 0) {
      if (need_dx) dx = at::zeros({0, dims.n_in}, x.options());
      if (need_dl) dl = at::zeros_like(ia3_scale);
    } else if (need_dx || need_dl) {
      std::tie(dx, dl) = input_scale_grads(g2, x2, weight, ia3_scale, dims, need_dx, need_dl);
    }
  } else {
    if (need_dw || need_db) {
      const at::Tensor gl = g2 * ia3_scale;
      if (need_dw) dw = at::mm(gl.t(), x2);
      if (need_db) db = gl.sum(0);
    }
    if (need_dx) dx = cpu::ia3_output_grad_x(g2, weight, ia3_scale);
    if (need_dl) {
      dl = dims.rows == 0 ? at::zeros_like(ia3_scale)
                          : output_scale_grad(out.reshape({dims.rows, dims.n_out}).contiguous(), g2, x2, weight,
                                              bias, ia3_scale, dims);
    }
  }
  return {dx.defined() ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt, defined_or_none(dw),
          defined_or_none(db), defined_or_none(dl)};
}

void register_impls(torch::Library& m) {
  m.impl("ia3_linear_forward", fresh_outputs<&ia3_linear_forward>);
  m.impl("ia3_linear_backward", fresh_outputs<&ia3_linear_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
