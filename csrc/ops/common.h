// Shared by the ops: argument checks (every failure is a Python exception naming the op and the
// argument: TypeError for dtypes, ValueError for shapes, values and devices), small helpers, and
// the one registration style.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#ifdef PEFTKERN_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels/kernel_types.h"

namespace peftkern::ops {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float16, bfloat16 or float64); got ", t.scalar_type());
}

// t must have ref's dtype and device (ref is the op's first input, named ref_name).
inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), "; all floating-point inputs must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all inputs must be on one device");
}

inline void check_like(const std::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  if (t) check_like(*t, op, name, ref, ref_name);
}

// Rows, in and out features of a linear layer's x [..., in_features], weight [out, in], bias [out].
struct LinearDims {
  int64_t rows, n_in, n_out;
};

inline LinearDims check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_floating(x, op, "x");
  check_like(weight, op, "weight", x, "x");
  check_like(bias, op, "bias", x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, op,
                    ": x must have shape [..., in_features] with in_features >= 1; got ", x.sizes());
  const int64_t n_in = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == n_in && weight.size(0) >= 1, op,
                    ": weight must have shape [out_features, in_features] with in_features = ", n_in,
                    " (x's last dimension); got ", weight.sizes());
  const int64_t n_out = weight.size(0);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n_out), op,
                    ": bias must have shape [out_features] = [", n_out, "]; got ",
                    bias ? bias->sizes() : at::IntArrayRef{});
  return {x.numel() / n_in, n_in, n_out};
}

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "peftkern: no CUDA kernel for dtype ", t);
  }
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// shape with its last dimension replaced
inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  s.back() = last;
  return s;
}

// x2 @ weight^T + bias (cuBLAS on CUDA)
inline at::Tensor base_product(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// True while t's device's current stream is being captured into a CUDA graph (no host reads then).
inline bool capturing(const at::Tensor& t) {
#ifdef PEFTKERN_WITH_CUDA
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
#else
  (void)t;
  return false;
#endif
}

// ids: int32/int64, on ref's device, shape [n] (named n_name), values in [lo, hi). The range check
// copies the ids' min and max to the host in one transfer (a device sync), so it is skipped inside
// CUDA graph capture (each op documents what its kernel then does with an out-of-range id) and when
// check_values is false (a backward, whose forward already checked the same ids).
inline void check_ids(const char* op, const char* name, const at::Tensor& ids, int64_t n, const char* n_name,
                      const at::Tensor& ref, const char* ref_name, int64_t lo, int64_t hi, const char* range,
                      bool check_values = true) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op, ": ", name,
                   " must be an int32 or int64 tensor; got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == ref.device(), op, ": ", name, " is on ", ids.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == n, op, ": ", name, " must have shape [", n_name, "] = [", n,
                    "]; got ", ids.sizes());
  if (check_values && n > 0 && !capturing(ids)) {
    const auto [mn_t, mx_t] = at::aminmax(ids);
    const at::Tensor seen = at::stack({mn_t, mx_t}).to(at::kLong).cpu();  // the one device-to-host copy
    const int64_t mn = seen.data_ptr<int64_t>()[0], mx = seen.data_ptr<int64_t>()[1];
    TORCH_CHECK_VALUE(mn >= lo && mx < hi, op, ": ", name, " must be in ", range, " = [", lo, ", ", hi,
                      "); got values in [", mn, ", ", mx, "]");
  }
}

// An op's kernel runs below the ADInplaceOrView key, as ATen's own kernels do: its internal
// reshapes and transposes then carry no autograd view metadata, so each output reaches the caller
// as a fresh tensor (as nn.Linear's does). A view output would warn under FSDP2, and an in-place op
// on it would skip FSDP's pre-backward hook. Register every op as m.impl(name, fresh_outputs<&fn>).
template <auto Fn>
struct FreshOutputs;
template <typename R, typename... Args, R (*Fn)(Args...)>
struct FreshOutputs<Fn> {
  static R call(Args... args) {
    const at::AutoDispatchBelowADInplaceOrView below_views;
    return Fn(std::forward<Args>(args)...);
  }
};
template <auto Fn>
constexpr auto fresh_outputs = &FreshOutputs<Fn>::call;

}  // namespace peftkern::ops

// Every op registers ONE implementation (through fresh_outputs) under both dispatch keys; it branches
// on the device itself (the CUDA kernels where they apply, else the ATen composite of csrc/cpu/). A
// glue file defines
// `void register_impls(torch::Library& m)` and ends with PEFTKERN_REGISTER_IMPLS(register_impls).
#ifdef PEFTKERN_WITH_CUDA
#define PEFTKERN_REGISTER_IMPLS(fn)               \
  TORCH_LIBRARY_IMPL(peftkern, CPU, m) { fn(m); } \
  TORCH_LIBRARY_IMPL(peftkern, CUDA, m) { fn(m); }
#else
#define PEFTKERN_REGISTER_IMPLS(fn) \
  TORCH_LIBRARY_IMPL(peftkern, CPU, m) { fn(m); }
#endif
