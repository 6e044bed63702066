// Types and size arithmetic shared by the CUDA launchers, the CPU path and the torch glue. No torch,
// no CUDA header.
#pragma once

#include <cstdint>

// Functions shared by host code and CUDA kernels.
#if defined(__CUDACC__)
#define PEFTKERN_HD __host__ __device__ __forceinline__
#else
#define PEFTKERN_HD inline
#endif

namespace peftkern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T> PEFTKERN_HD constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }
// v rounded up to a multiple of `multiple`
template <typename T> PEFTKERN_HD constexpr T round_up(T v, T multiple) { return ceil_div(v, multiple) * multiple; }

// Packed masks (mask tuning) hold 32 columns per int32 word: [rows, mask_words(cols)].
PEFTKERN_HD constexpr int64_t mask_words(int64_t cols) { return ceil_div<int64_t>(cols, 32); }

// Bottleneck activations. The CUDA kernels and the CPU path implement the same formulas:
//   gelu       0.5 z (1 + erf(z / sqrt 2))
//   gelu_tanh  0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
//   relu       max(z, 0), gradient 0 at z = 0
//   silu       z sigmoid(z)
//   identity   z (LoRA)
enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3, kIdentity = 4 };

}  // namespace peftkern
