// peftkern::masked_linear_* / pack_mask / unpack_mask / masked_linear_packed / masked_linear_multi:
// checks, then the CPU path (ATen), or on CUDA the mask kernels of csrc/kernels/mask.h with the
// large products through cuBLAS.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/mask.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/mask.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "masked_linear";

struct Dims {
  int64_t rows, n_in, n_out;
};

int64_t words_for(int64_t cols) { return (cols + 31) / 32; }

// x [..., in], weight [out, in], bias [out]: the linear part every masked op shares.
Dims check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_floating(x, op, "x");
  check_like(weight, op, "weight", x, "x");
  check_like(bias, op, "bias", x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have shape [..., in_features]; got ", x.sizes());
  const int64_t n_in = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == n_in && weight.size(0) >= 1, op,
                    ": weight must have shape [out_features, in_features] with in_features = ", n_in,
                    " (x's last dimension); got ", weight.sizes());
  const int64_t n_out = weight.size(0);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n_out), op, ": bias must have shape [out_features] = [",
                    n_out, "]; got ", bias ? bias->sizes() : at::IntArrayRef{});
  return {x.numel() / n_in, n_in, n_out};
}

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

void check_bits(const char* op, const char* name, const at::Tensor& bits, at::IntArrayRef lead, int64_t n_out,
                int64_t n_in, const at::Device& device) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kInt, op, ": ", name, " must be int32 (packed by pack_mask); got ",
                   bits.scalar_type());
  TORCH_CHECK_VALUE(bits.device() == device, op, ": ", name, " is on ", bits.device(), " but x is on ", device);
  std::vector<int64_t> want(lead.begin(), lead.end());
  want.push_back(n_out);
  want.push_back(words_for(n_in));
  TORCH_CHECK_VALUE(bits.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", at::IntArrayRef(want),
                    " ([.., out_features, ceil(in_features / 32)] words); got ", bits.sizes());
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>>;

#ifdef PEFTKERN_WITH_CUDA
bool kernel_dtypes(const at::Tensor& w, const at::Tensor& s) {
  return w.scalar_type() != at::kDouble && s.scalar_type() != at::kDouble;
}
#endif

// ------------------------------------------------------------------ masked_linear

std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                                  double threshold, bool save) {
  const Dims dims = check_linear(kOp, x, weight, bias);
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
    if (save) bits = at::empty({dims.n_out, words_for(dims.n_in)}, weight.options().dtype(at::kInt));
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

Grads masked_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                      const at::Tensor& bits, std::array<bool, 4> need) {
  const Dims dims = check_linear(kOp, x, weight, std::nullopt);
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
    const at::Tensor grad_w_eff = at::mm(g2.to(mt).t(), x2.to(mt));  // dL/dW_eff
    if (need_ds) ds = (grad_w_eff * weight.to(mt)).to(scores.scalar_type());  // straight through
    if (need_dw) dw = (grad_w_eff * keep).to(weight.scalar_type());
  }
  return {defined_or_none(dx), defined_or_none(dw), defined_or_none(db), defined_or_none(ds)};
}

// ------------------------------------------------------------------ bits

at::Tensor pack_mask(const at::Tensor& scores, double threshold) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "pack_mask: scores must be a floating-point tensor; got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2, "pack_mask: scores must be 2-D [out_features, in_features]; got ", scores.sizes());
#ifdef PEFTKERN_WITH_CUDA
  if (scores.is_cuda() && scores.scalar_type() != at::kDouble && scores.numel() > 0) {
    const c10::cuda::CUDAGuard guard(scores.device());
    const at::Tensor s = scores.contiguous();
    at::Tensor bits = at::empty({scores.size(0), words_for(scores.size(1))}, scores.options().dtype(at::kInt));
    kernels::MaskApplyArgs a{};
    a.w_dtype = a.s_dtype = kernel_dtype(scores.scalar_type());
    a.rows = scores.size(0);
    a.cols = scores.size(1);
    a.threshold = static_cast<float>(threshold);
    a.scores = s.data_ptr();
    a.bits_out = bits.data_ptr<int32_t>();
    C10_CUDA_CHECK(kernels::mask_apply(a, at::cuda::getCurrentCUDAStream()));
    return bits;
  }
#endif
  return cpu::pack_bits(cpu::keep_mask(scores, threshold));
}

at::Tensor unpack_mask(const at::Tensor& bits, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, "unpack_mask: shape must be [out_features, in_features]; got ",
                    shape);
  check_bits("unpack_mask", "bits", bits, {}, shape[0], shape[1], bits.device());
  return cpu::unpack_bits(bits, shape[1]);
}

// ------------------------------------------------------------------ packed masks, many tasks

#ifdef PEFTKERN_WITH_CUDA
// out = x2 @ (weight * mask)^T + bias with the mask from bits (task_ids: per-token masks) on CUDA,
// for at most kMaskedMatvecMaxTokens rows.
at::Tensor packed_matvec(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& bits, const at::Tensor& task_ids) {
  const at::Tensor xc = x2.contiguous(), w = weight.contiguous(), bc = bits.contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x2.size(0), weight.size(0)}, x2.options());
  kernels::MaskedMatvecArgs a{};
  a.dtype = a.s_dtype = kernel_dtype(x2.scalar_type());
  a.tokens = x2.size(0);
  a.n_in = x2.size(1);
  a.n_out = weight.size(0);
  a.x = xc.data_ptr();
  a.weight = w.data_ptr();
  a.bias = data_or_null(b);
  a.bits = bc.data_ptr<int32_t>();
  const at::Tensor ids = task_ids.defined() ? task_ids.to(at::kLong).contiguous() : task_ids;
  a.task_ids = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  C10_CUDA_CHECK(kernels::masked_matvec(a, at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpack_apply_cuda(const at::Tensor& weight, const at::Tensor& bits) {
  const at::Tensor w = weight.contiguous(), bc = bits.contiguous();
  at::Tensor w_eff = at::empty_like(w);
  kernels::MaskApplyArgs a{};
  a.w_dtype = a.s_dtype = kernel_dtype(weight.scalar_type());
  a.rows = weight.size(0);
  a.cols = weight.size(1);
  a.weight = w.data_ptr();
  a.bits_in = bc.data_ptr<int32_t>();
  a.w_eff = w_eff.data_ptr();
  C10_CUDA_CHECK(kernels::mask_apply(a, at::cuda::getCurrentCUDAStream()));
  return w_eff;
}
#endif

// weight * mask from packed bits.
at::Tensor unpack_apply(const at::Tensor& weight, const at::Tensor& bits) {
#ifdef PEFTKERN_WITH_CUDA
  if (weight.is_cuda() && weight.scalar_type() != at::kDouble) {
    const c10::cuda::CUDAGuard guard(weight.device());
    return unpack_apply_cuda(weight, bits);
  }
#endif
  return weight * cpu::unpack_bits(bits, weight.size(1));
}

at::Tensor masked_packed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& bits) {
  const char* op = "masked_linear_packed";
  const Dims dims = check_linear(op, x, weight, bias);
  check_bits(op, "mask_bits", bits, {}, dims.n_out, dims.n_in, x.device());
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  const auto out_shape = with_last(x.sizes(), dims.n_out);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && x.scalar_type() != at::kDouble && dims.rows <= kernels::kMaskedMatvecMaxTokens) {
    const c10::cuda::CUDAGuard guard(x.device());
    return packed_matvec(x2, weight, bias, bits, at::Tensor()).view(out_shape);
  }
#endif
  return base_product(x2, unpack_apply(weight, bits), bias).view(out_shape);
}

at::Tensor masked_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& bits, const at::Tensor& task_ids) {
  const char* op = "masked_linear_multi";
  const Dims dims = check_linear(op, x, weight, bias);
  TORCH_CHECK_VALUE(bits.dim() == 3, op, ": mask_bits_stack must have shape [tasks, out_features, ceil(in_features / 32)]; got ",
                    bits.sizes());
  const int64_t tasks = bits.size(0);
  check_bits(op, "mask_bits_stack", bits, {tasks}, dims.n_out, dims.n_in, x.device());
  check_ids(op, "task_ids", task_ids, dims.rows, "tokens", x, "x", -1, tasks, "[-1, tasks)");  // capture: out of range acts as -1
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  const auto out_shape = with_last(x.sizes(), dims.n_out);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && x.scalar_type() != at::kDouble && dims.rows <= kernels::kMaskedMatvecMaxTokens) {
    const c10::cuda::CUDAGuard guard(x.device());
    return packed_matvec(x2, weight, bias, bits, task_ids).view(out_shape);
  }
#endif
  // Larger batches: one masked weight and one product per task present (host reads the counts).
  at::Tensor out = at::empty({dims.rows, dims.n_out}, x.options());
  const at::Tensor ids = task_ids.to(at::kLong);
  const at::Tensor present = std::get<0>(at::_unique(ids.cpu()));
  for (int64_t i = 0; i < present.numel(); ++i) {
    const int64_t task = present[i].item<int64_t>();
    const at::Tensor idx = (ids == task).nonzero().squeeze(1);
    const at::Tensor w = task < 0 ? weight : unpack_apply(weight, bits[task]);
    out.index_copy_(0, idx, base_product(x2.index_select(0, idx), w, bias));
  }
  return out.view(out_shape);
}

}  // namespace

// Each function branches on the device itself (ATen on the CPU, the kernels on CUDA).
void register_mask_impls(torch::Library& m) {
  m.impl("masked_linear_forward", &masked_forward);
  m.impl("masked_linear_backward", &masked_backward);
  m.impl("pack_mask", &pack_mask);
  m.impl("unpack_mask", &unpack_mask);
  m.impl("masked_linear_packed", &masked_packed);
  m.impl("masked_linear_multi", &masked_multi);
}

TORCH_LIBRARY_IMPL(peftkern, CPU, m) { register_mask_impls(m); }
#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) { register_mask_impls(m); }
#endif

}  // namespace peftkern::ops
