// Device helpers shared by peftkern's kernels: element conversion, activations, cp.async tile loads
// and a warp-level tensor-core MMA that covers fp16, bf16 and float32 with one interface.
// Included only by .cu files; no torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "kernel_types.h"

namespace peftkern::cuda {

namespace wmma = nvcuda::wmma;

// ------------------------------------------------------------------ element conversion

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------ activations (float32 math)

__device__ __forceinline__ float activation_fn(Activation a, float z) {
  switch (a) {
    case Activation::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(u));
    }
    case Activation::kRelu: return z > 0.f ? z : 0.f;
    case Activation::kSilu: return z / (1.f + expf(-z));
    case Activation::kIdentity: return z;
  }
  return z;
}

__device__ __forceinline__ float activation_grad(Activation a, float z) {
  switch (a) {
    case Activation::kGelu:
      return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case Activation::kGeluTanh: {
      const float k = 0.79788456080286536f;
      const float t = tanhf(k * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * z * z);
    }
    case Activation::kRelu: return z > 0.f ? 1.f : 0.f;
    case Activation::kSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    case Activation::kIdentity: return 1.f;
  }
  return 1.f;
}

// ------------------------------------------------------------------ cp.async

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Which global rows a tile's local rows 0.. are; -1 = none (the row is zero-filled).
struct RowRange {  // rows row0, row0 + 1, ... of a matrix with nrows rows
  int64_t row0, nrows;
  __device__ __forceinline__ int64_t operator()(int i) const { return row0 + i < nrows ? row0 + i : -1; }
};
struct RowList {  // local row i is rows[i] (a list in shared memory)
  const int64_t* rows;
  __device__ __forceinline__ int64_t operator()(int i) const { return rows[i]; }
};

// Copies a ROWS x COLS tile of a row-major global matrix [.., ncols, row stride ld] into shared
// memory (row stride SLD): local row i from global row rows(i), columns col0.., zero-filling rows
// mapped to -1 and columns past ncols. vec: 16-byte cp.async, allowed when the base and ld are
// 16-byte aligned (so ncols, a multiple of the vector, never splits one). Otherwise a synchronous
// element-wise copy (any shape).
template <typename T, int ROWS, int COLS, int SLD, int NTHREADS, typename RowMap>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t ld, RowMap rows, int64_t col0, int64_t ncols,
                                          bool vec) {
  if (vec) {
    constexpr int V = kVec<T>;
    static_assert(COLS % V == 0, "tile width must be a whole number of 16-byte vectors");
    constexpr int kPerRow = COLS / V;
    for (int i = threadIdx.x; i < ROWS * kPerRow; i += NTHREADS) {
      const int r = i / kPerRow, c = (i % kPerRow) * V;
      const int64_t row = rows(r);
      const bool ok = row >= 0 && col0 + c < ncols;
      const T* src = ok ? base + row * ld + col0 + c : base;
      cp_async_16(smem + r * SLD + c, src, ok);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += NTHREADS) {
      const int r = i / COLS, c = i % COLS;
      const int64_t row = rows(r);
      const bool ok = row >= 0 && col0 + c < ncols;
      smem[r * SLD + c] = ok ? base[row * ld + col0 + c] : from_float<T>(0.f);
    }
  }
}

// Reads 8 consecutive values of src as float32 (zeros past `valid`); one or two 16-byte loads when
// vec (src 16-byte aligned and valid == 8).
template <typename T> __device__ __forceinline__ void load8(const T* src, float (&v)[8], bool vec, int valid) {
  if (vec && valid >= 8) {
    if constexpr (std::is_same_v<T, float>) {
      const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
      v[0] = a.x;
      v[1] = a.y;
      v[2] = a.z;
      v[3] = a.w;
      v[4] = b.x;
      v[5] = b.y;
      v[6] = b.z;
      v[7] = b.w;
    } else {
      union {
        uint4 u;
        T e[8];
      } pack;
      pack.u = *reinterpret_cast<const uint4*>(src);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = to_float(pack.e[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = e < valid ? to_float(src[e]) : 0.f;
  }
}

// Writes 8 consecutive values (float32 math) to dst as T; one or two 16-byte stores when vec.
template <typename T> __device__ __forceinline__ void store8(T* dst, const float (&v)[8], bool vec, int valid) {
  if (vec && valid >= 8) {
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      union {
        uint4 u;
        T e[8];
      } pack;
#pragma unroll
      for (int e = 0; e < 8; ++e) pack.e[e] = from_float<T>(v[e]);
      *reinterpret_cast<uint4*>(dst) = pack.u;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < valid) dst[e] = from_float<T>(v[e]);
  }
}

// ------------------------------------------------------------------ warp-level tensor-core MMA
// acc(16x16, float32) += A(16 x kK) * B(kK x 16). fp16/bf16: one m16n16k16 HMMA step. float32:
// m16n16k8 TF32 with operands split into hi + lo parts (3 products, "3xTF32"), which keeps the
// result at float32 accuracy (error ~1e-6 relative, against ~1e-3 for plain TF32).
// Fragment pointers must be 32-byte aligned and ld a multiple of 16 bytes (wmma's rules).

template <typename T> struct Mma {
  static constexpr int kK = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename Layout> struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout> f;
    __device__ __forceinline__ void load(const T* p, int ld) { wmma::load_matrix_sync(f, p, ld); }
  };
  template <typename Layout> struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout> f;
    __device__ __forceinline__ void load(const T* p, int ld) { wmma::load_matrix_sync(f, p, ld); }
  };
  template <typename LA, typename LB>
  __device__ __forceinline__ static void mma(Acc& acc, const A<LA>& a, const B<LB>& b) {
    wmma::mma_sync(acc, a.f, b.f, acc);
  }
};

template <> struct Mma<float> {
  static constexpr int kK = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename F> __device__ __forceinline__ static void split(F& hi, F& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float v = hi.x[i];
      const float h = wmma::__float_to_tf32(v);
      hi.x[i] = h;
      lo.x[i] = wmma::__float_to_tf32(v - h);
    }
  }
  template <typename Layout> struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;
    __device__ __forceinline__ void load(const float* p, int ld) {
      wmma::load_matrix_sync(hi, p, ld);
      split(hi, lo);
    }
  };
  template <typename Layout> struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;
    __device__ __forceinline__ void load(const float* p, int ld) {
      wmma::load_matrix_sync(hi, p, ld);
      split(hi, lo);
    }
  };
  template <typename LA, typename LB>
  __device__ __forceinline__ static void mma(Acc& acc, const A<LA>& a, const B<LB>& b) {
    wmma::mma_sync(acc, a.lo, b.hi, acc);  // small terms first
    wmma::mma_sync(acc, a.hi, b.lo, acc);
    wmma::mma_sync(acc, a.hi, b.hi, acc);
  }
};

// Offset of element (i, k) of A, or (k, j) of B, in a buffer of the given layout and ld.
template <typename Layout> __device__ __forceinline__ int a_at(int i, int k, int ld) {
  return std::is_same_v<Layout, wmma::row_major> ? i * ld + k : k * ld + i;
}
template <typename Layout> __device__ __forceinline__ int b_at(int k, int j, int ld) {
  return std::is_same_v<Layout, wmma::row_major> ? k * ld + j : j * ld + k;
}

// Records, as a PTX comment at the top of a kernel, the most dynamic shared memory its launcher
// gives it (a compile-time constant), so scripts/static_budget.py can count each instance's shared
// memory per block without a GPU. Costs no instruction.
#define PEFTKERN_DYNAMIC_SMEM(bytes) asm volatile("// peftkern.dynamic_smem %0" ::"n"(bytes))

// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel> cudaError_t set_smem_limit(Kernel kernel, int bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                           : cudaSuccess;
}

// Row padding that keeps 16-byte rows and spreads 8-row fragment loads over all banks.
template <typename T> constexpr int kSmemPad = kVec<T>;

}  // namespace peftkern::cuda
