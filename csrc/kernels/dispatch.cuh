// Compile-time switches of the launchers (as flash-attention's static_switch.h): a runtime dtype or
// size picks one compiled instance. Included only by .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "kernel_types.h"

namespace peftkern::cuda {

template <typename T> struct TypeTag {
  using type = T;
};
template <int V> using IntTag = std::integral_constant<int, V>;

// f(TypeTag<T>{}) with T the element type of dtype (float, __half or __nv_bfloat16).
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(IntTag<B>{}) for the first of the ascending kBuckets with n <= B; cudaErrorInvalidValue when n
// exceeds the last.
template <int... kBuckets, typename F> cudaError_t dispatch_bucket(int n, F&& f) {
  cudaError_t result = cudaErrorInvalidValue;
  (void)((n <= kBuckets && (result = f(IntTag<kBuckets>{}), true)) || ...);
  return result;
}

}  // namespace peftkern::cuda
