// peftkern::masked_linear_forward / masked_linear_backward: out = x @ (weight * m)^T + bias with
// m = scores > threshold, straight-through gradient to scores. CUDA: the mask kernels of
// kernels/mask.h (one pass builds weight * m and the packed bits; the backward rebuilds it from the
// bits and applies the straight-through product in one pass; a mat-vec for small batches), the
// products through cuBLAS. CPU and float64: the ATen composite of cpu/mask.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "ops/common.h"
#include "ops/mask_bits.h"

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "masked_linear";

using Grads4 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>;

void check_scores(const char* op, const at::Tensor& scores, const at::Tensor& weight) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), op, ": scores must be a floating-point tensor; got ",
                   scores.scalar_type());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == weight.scalar_type(), op,
                   ": scores must be float32 or the weight's dtype (", weight.scalar_type(), "); got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.device() == weight.device(), op, ": scores is on ", scores.device(), " but weight is on ",
                    weight.device());
  TORCH_CHECK_VALUE(scores.sizes() == weight.sizes(), op, ": scores must have the weight's shape ", weight.sizes(),
                    "; got ", scores.sizes());
}

#ifdef PEFTKERN_WITH_CUDA
bool kernel_dtypes(const at::Tensor& w, const at::Tensor& s) {
  return w.scalar_type() != at::kDouble && s.scalar_type() != at::kDouble;
}
#endif

std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                                  double threshold, bool save) {
  const LinearDims dims = check_linear(kOp, x, weight, bias);
  check_scores(kOp, scores, weight);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  const auto out_shape = with_last(x.sizes(), dims.n_out);
  at::Tensor bits = at::empty({0}, weight.options().dtype(at::kInt));
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && kernel_dtypes(weight, scores)) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor w = weight.contiguous(), s = scores.contiguous();
    if (!save && dims.rows <= kernels::kMaskedMatvecMaxTokens) {  // small batches: mask applied on load
      const at::Tensor xc = x2.contiguous();
      at::Tensor out = at::empty({dims.rows, dims.n_out}, x.options());
      const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
      kernels::MaskedMatvecArgs a{};
      a.dtype = kernel_dtype(x.scalar_type());
      a.s_dtype = kernel_dtype(scores.scalar_type());
      a.tokens = dims.rows;
      a.n_in = dims.n_in;
      a.n_out = dims.n_out;
      a.threshold = static_cast<float>(threshold);
      a.x = xc.data_ptr();
      a.weight = w.data_ptr();
      a.bias = data_or_null(b);
      a.scores = s.data_ptr();
      a.out = out.data_ptr();
      C10_CUDA_CHECK(kernels::masked_matvec(a, stream));
      return {out.view(out_shape), bits};
    }
    at::Tensor w_eff = at::empty_like(w);
    if (save) bits = at::empty({dims.n_out, mask_words(dims.n_in)}, weight.options().dtype(at::kInt));
    kernels::MaskApplyArgs a{};
    a.w_dtype = kernel_dtype(weight.scalar_type());
    a.s_dtype = kernel_dtype(scores.scalar_type());
    a.rows = dims.n_out;
    a.cols = dims.n_in;
    a.threshold = static_cast<float>(threshold);
    a.weight = w.data_ptr();
    a.scores = s.data_ptr();
    a.w_eff = w_eff.data_ptr();
    a.bits_out = save ? bits.data_ptr<int32_t>() : nullptr;
    C10_CUDA_CHECK(kernels::mask_apply(a, stream));
    return {base_product(x2, w_eff, bias).view(out_shape), bits};
  }
#endif
  const at::Tensor keep = cpu::keep_mask(scores, threshold);
  if (save) bits = cpu::pack_bits(keep);
  return {base_product(x2, weight * keep, bias).view(out_shape), bits};
}

Grads4 masked_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& scores, const at::Tensor& bits, std::array<bool, 4> need) {
  const LinearDims dims = check_linear(kOp, x, weight, std::nullopt);
  check_scores(kOp, scores, weight);
  check_bits(kOp, "mask_bits", bits, {}, dims.n_out, dims.n_in, x.device());
  const auto [need_dx, need_dw, need_db, need_ds] = need;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out});
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor dx, dw, db, ds;
  if (need_db) db = g2.sum(0);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && kernel_dtypes(weight, scores)) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor w = weight.contiguous();
    at::Tensor buf = at::empty_like(w);  // w_eff for dx, then G = dL/dW_eff
    if (need_dx) {
      kernels::MaskApplyArgs a{};
      a.w_dtype = a.s_dtype = kernel_dtype(weight.scalar_type());
      a.rows = dims.n_out;
      a.cols = dims.n_in;
      a.weight = w.data_ptr();
      a.bits_in = bits.data_ptr<int32_t>();
      a.w_eff = buf.data_ptr();
      C10_CUDA_CHECK(kernels::mask_apply(a, stream));
      dx = at::mm(g2, buf).view(x.sizes());
    }
    if (need_dw || need_ds) {
      at::mm_out(buf, g2.t(), x2);
      if (need_ds) ds = at::empty(scores.sizes(), scores.options());
      if (need_dw) dw = at::empty_like(w);
      kernels::MaskSteArgs a{};
      a.w_dtype = kernel_dtype(weight.scalar_type());
      a.s_dtype = kernel_dtype(scores.scalar_type());
      a.rows = dims.n_out;
      a.cols = dims.n_in;
      a.grad_w_eff = buf.data_ptr();
      a.weight = w.data_ptr();
      a.bits = bits.data_ptr<int32_t>();
      a.d_scores = need_ds ? ds.data_ptr() : nullptr;
      a.d_weight = need_dw ? dw.data_ptr() : nullptr;
      C10_CUDA_CHECK(kernels::mask_ste_backward(a, stream));
    }
    return {defined_or_none(dx), defined_or_none(dw), defined_or_none(db), defined_or_none(ds)};
  }
#endif
  const at::Tensor keep = cpu::unpack_bits(bits, dims.n_in);
  const auto mt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (need_dx) dx = at::mm(g2.to(mt), (weight * keep).to(mt)).to(x.scalar_type()).view(x.sizes());
  if (need_dw || need_ds) {
    const at::Tensor grad_w_eff = at::mm(g2.to(mt).t(), x2.to(mt));           // dL/dW_eff
    if (need_ds) ds = (grad_w_eff * weight.to(mt)).to(scores.scalar_type());  // straight through
    if (need_dw) dw = (grad_w_eff * keep).to(weight.scalar_type());
  }
  return {defined_or_none(dx), defined_or_none(dw), defined_or_none(db), defined_or_none(ds)};
}

void register_impls(torch::Library& m) {
  m.impl("masked_linear_forward", fresh_outputs<&masked_forward>);
  m.impl("masked_linear_backward", fresh_outputs<&masked_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
