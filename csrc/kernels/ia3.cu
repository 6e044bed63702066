// (IA)^3 backward kernels (see ia3.h).
//   column partials  CTA (64 columns, row split): each lane owns two adjacent columns (one 4- or
//                    8-byte load per row and operand), 8 warps stride the split's rows; float32
//                    sums reduced over the warps in a fixed order into partials[split, col];
//                    input scale: a is rewritten as a * l in the same pass
//   column finalize  one thread per column sums the splits in order (/ l for output scale)
//   zero-scale grad  CTA (output column, row split); exits unless l[j] is rescued, else recomputes
//                    z[t, j] = x[t] . w[j] + b[j] per row of its split (a warp per row, lanes over
//                    n_in) into partials[split, j]; a finalize sums a rescued column's splits in order
#include "common.cuh"
#include "dispatch.cuh"
#include "ia3.h"

namespace peftkern::kernels {
namespace {

using namespace peftkern::cuda;

constexpr int kColThreads = 256;
constexpr int kColWarps = kColThreads / 32;
constexpr int kColsPerCta = 64;  // two per lane
constexpr int kFinalizeThreads = 256;
constexpr int kRescueThreads = 256;
constexpr int kRescueWarps = kRescueThreads / 32;
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kRescueMaxSplits = 64;
constexpr int64_t kRescueMinRowsPerSplit = 128;

// Zero or tiny (out = l z lost z's digits), inf or NaN (out / l is not z): recomputed from x and W.
// The same predicate in the finalize, the rescue kernel and the CPU path (cpu::ia3_rescued).
__device__ __forceinline__ bool rescued(float l, float rescue_below) {
  return !(fabsf(l) >= rescue_below) || isinf(l);
}

// Two adjacent elements as float32 (the second 0 when absent); one load when vec.
template <typename T> __device__ __forceinline__ void load2(const T* p, float& v0, float& v1, bool vec, bool has1) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float2 f = *reinterpret_cast<const float2*>(p);
      v0 = f.x;
      v1 = f.y;
    } else {
      union {
        uint32_t u;
        T e[2];
      } pack;
      pack.u = *reinterpret_cast<const uint32_t*>(p);
      v0 = to_float(pack.e[0]);
      v1 = to_float(pack.e[1]);
    }
  } else {
    v0 = to_float(p[0]);
    v1 = has1 ? to_float(p[1]) : 0.f;
  }
}

template <typename T> __device__ __forceinline__ void store2(T* p, float v0, float v1, bool vec, bool has1) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
      union {
        uint32_t u;
        T e[2];
      } pack;
      pack.e[0] = from_float<T>(v0);
      pack.e[1] = from_float<T>(v1);
      *reinterpret_cast<uint32_t*>(p) = pack.u;
    }
  } else {
    p[0] = from_float<T>(v0);
    if (has1) p[1] = from_float<T>(v1);
  }
}

template <typename T, bool kScaleA>
__global__ void __launch_bounds__(kColThreads) ia3_column_partials_kernel(const IA3ColumnArgs a, int64_t rows_per_split,
                                                                           bool vec) {
  __shared__ float red[kColWarps][kColsPerCta];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T* __restrict__ A = static_cast<T*>(a.a);  // a and b never alias: the loads may pass the store
  const T* __restrict__ B = static_cast<const T*>(a.b);
  const T* scale = static_cast<const T*>(a.scale);
  const int64_t c = int64_t(blockIdx.x) * kColsPerCta + 2 * lane;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < a.rows ? r0 + rows_per_split : a.rows;
  const bool has0 = c < a.cols, has1 = c + 1 < a.cols;
  float s0 = 0.f, s1 = 0.f;
  if (has0) {
    float l0 = 1.f, l1 = 1.f;
    if (kScaleA) {
      l0 = to_float(scale[c]);
      l1 = has1 ? to_float(scale[c + 1]) : 0.f;
    }
#pragma unroll 4
    for (int64_t r = r0 + warp; r < r1; r += kColWarps) {
      const int64_t off = r * a.cols + c;
      float a0, a1, b0, b1;
      load2(A + off, a0, a1, vec, has1);
      load2(B + off, b0, b1, vec, has1);
      s0 += a0 * b0;
      s1 += a1 * b1;
      if (kScaleA) store2(A + off, a0 * l0, a1 * l1, vec, has1);
    }
  }
  red[warp][2 * lane] = s0;
  red[warp][2 * lane + 1] = s1;
  __syncthreads();
  if (threadIdx.x < kColsPerCta) {
    const int64_t col = int64_t(blockIdx.x) * kColsPerCta + threadIdx.x;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kColWarps; ++w) s += red[w][threadIdx.x];  // fixed order: deterministic
    if (col < a.cols) a.partials[int64_t(blockIdx.y) * a.cols + col] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) ia3_column_finalize_kernel(const IA3ColumnArgs a, int64_t splits) {
  const int64_t c = int64_t(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (c >= a.cols) return;
  float s = 0.f;
  for (int64_t i = 0; i < splits; ++i) s += a.partials[i * a.cols + c];
  if (a.divide_by_scale) {
    const float l = to_float(static_cast<const T*>(a.scale)[c]);
    if (rescued(l, a.rescue_below)) return;  // ia3_zero_scale_grad's column
    s /= l;
  }
  static_cast<T*>(a.grad_scale)[c] = from_float<T>(s);
}

template <typename T>
__global__ void __launch_bounds__(kRescueThreads) ia3_zero_scale_partials_kernel(const IA3ZeroScaleArgs a,
                                                                                 int64_t rows_per_split) {
  __shared__ float red[kRescueWarps];
  const int64_t j = blockIdx.x;
  const float l = to_float(static_cast<const T*>(a.scale)[j]);
  if (!rescued(l, a.rescue_below)) return;  // uniform over the CTA
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight) + j * a.w_row_stride;
  const T* g = static_cast<const T*>(a.grad_out);
  const float bj = a.bias ? to_float(static_cast<const T*>(a.bias)[j]) : 0.f;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < a.rows ? r0 + rows_per_split : a.rows;
  float acc = 0.f;  // lane 0's sum over this warp's rows
  for (int64_t t = r0 + warp; t < r1; t += kRescueWarps) {
    const T* xt = x + t * a.n_in;
    float dot = 0.f;
    for (int64_t k = lane; k < a.n_in; k += 32) dot += to_float(xt[k]) * to_float(w[k * a.w_col_stride]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    acc += to_float(g[t * a.n_out + j]) * (dot + bj);
  }
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kRescueWarps; ++i) s += red[i];
    a.partials[int64_t(blockIdx.y) * a.n_out + j] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) ia3_zero_scale_finalize_kernel(const IA3ZeroScaleArgs a,
                                                                                   int64_t splits) {
  const int64_t j = int64_t(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (j >= a.n_out || !rescued(to_float(static_cast<const T*>(a.scale)[j]), a.rescue_below)) return;
  float s = 0.f;
  for (int64_t i = 0; i < splits; ++i) s += a.partials[i * a.n_out + j];  // only rescued columns were written
  static_cast<T*>(a.grad_scale)[j] = from_float<T>(s);
}

}  // namespace

int64_t ia3_column_splits(int64_t rows, int64_t cols, int num_sms) {
  if (rows <= 0 || cols <= 0) return 0;
  const int64_t col_ctas = ceil_div<int64_t>(cols, kColsPerCta);
  const int64_t want = ceil_div<int64_t>(4 * int64_t(num_sms > 0 ? num_sms : 1), col_ctas);  // ~4 CTAs per SM
  const int64_t most = ceil_div<int64_t>(rows, kMinRowsPerSplit);
  const int64_t splits = want < most ? want : most;
  const int64_t clamped = splits < 1 ? 1 : splits > 65535 ? 65535 : splits;
  return ceil_div<int64_t>(rows, ceil_div<int64_t>(rows, clamped));  // no empty split
}

cudaError_t ia3_column_grad(const IA3ColumnArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if (a.rows < 0 || !a.a || !a.b || !a.scale || !a.partials || !a.grad_scale) return cudaErrorInvalidValue;
  if (a.divide_by_scale == a.scale_a_in_place) return cudaErrorInvalidValue;  // exactly one mode
  const int64_t splits = ia3_column_splits(a.rows, a.cols, a.num_sms);
  const int64_t rows_per_split = ceil_div<int64_t>(a.rows, splits);
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr uintptr_t kPairBytes = 2 * sizeof(T);
    const bool vec = a.cols % 2 == 0 && reinterpret_cast<uintptr_t>(a.a) % kPairBytes == 0 &&
                     reinterpret_cast<uintptr_t>(a.b) % kPairBytes == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(a.cols, kColsPerCta)), static_cast<unsigned>(splits));
    if (a.scale_a_in_place)
      ia3_column_partials_kernel<T, true><<<grid, kColThreads, 0, stream>>>(a, rows_per_split, vec);
    else
      ia3_column_partials_kernel<T, false><<<grid, kColThreads, 0, stream>>>(a, rows_per_split, vec);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ia3_column_finalize_kernel<T>
        <<<static_cast<unsigned>(ceil_div<int64_t>(a.cols, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(a, splits);
    return cudaGetLastError();
  });
}

int64_t ia3_zero_scale_splits(int64_t rows) {
  if (rows <= 0) return 0;
  const int64_t want = ceil_div<int64_t>(rows, kRescueMinRowsPerSplit);
  const int64_t splits = want < kRescueMaxSplits ? want : kRescueMaxSplits;
  return ceil_div<int64_t>(rows, ceil_div<int64_t>(rows, splits));  // no empty split
}

cudaError_t ia3_zero_scale_grad(const IA3ZeroScaleArgs& a, cudaStream_t stream) {
  if (a.n_out == 0 || a.rows == 0) return cudaSuccess;
  if (a.rows < 0 || a.n_in < 1 || a.n_out > INT32_MAX || !a.scale || !a.grad_scale || !a.partials)
    return cudaErrorInvalidValue;
  if (!a.x || !a.weight || !a.grad_out) return cudaErrorInvalidValue;
  const int64_t splits = ia3_zero_scale_splits(a.rows);
  const int64_t rows_per_split = ceil_div<int64_t>(a.rows, splits);
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(a.n_out), static_cast<unsigned>(splits));
    ia3_zero_scale_partials_kernel<T><<<grid, kRescueThreads, 0, stream>>>(a, rows_per_split);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ia3_zero_scale_finalize_kernel<T>
        <<<static_cast<unsigned>(ceil_div<int64_t>(a.n_out, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(a,
                                                                                                            splits);
    return cudaGetLastError();
  });
}

}  // namespace peftkern::kernels
