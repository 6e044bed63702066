// Argument checks shared by the ops. Every failure is a Python exception naming the op and the
// argument: TypeError for dtypes, ValueError for shapes, values and devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "kernels/kernel_types.h"

namespace peftkern::ops {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float16, bfloat16 or float64); got ",
                   t.scalar_type());
}

// t must have ref's dtype and device (ref is the op's first input, named ref_name).
inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; all floating-point inputs must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

inline void check_like(const std::optional<at::Tensor>& t, const char* op, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  if (t) check_like(*t, op, name, ref, ref_name);
}

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "peftkern: no CUDA kernel for dtype ", t);
  }
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr() : nullptr;
}

}  // namespace peftkern::ops
