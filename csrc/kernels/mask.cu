// Mask-tuning kernels (see mask.h).
//   mask_apply         one pass: mask from scores (or bits) -> weight * mask and/or packed bits;
//                      a warp handles 32 consecutive columns per word, so each lane's compare is
//                      bit `lane` of the word (__ballot_sync packs it)
//   mask_ste_backward  one pass: d_scores = G * weight, d_weight = G * mask
//   masked_matvec      <= 16 tokens: each warp owns two output rows and streams their weights (and
//                      the mask source) once, the mask applied on load; x is staged in shared
//                      memory in 1024-column chunks
#include "common.cuh"
#include "dispatch.cuh"
#include "mask.h"

namespace peftkern::kernels {
namespace {

using namespace peftkern::cuda;

template <typename W, typename S> struct TypePair {
  using w = W;
  using s = S;
};
// Calls f(TypePair<TW, TS>{}) for the allowed pairs: scores float32 or the weight's dtype.
template <typename F> cudaError_t dispatch_weight_scores(DType w, DType s, F&& f) {
  return dispatch_dtype(w, [&](auto wtag) -> cudaError_t {
    using TW = typename decltype(wtag)::type;
    if (s == DType::kFloat32) return f(TypePair<TW, float>{});
    if (s == w) return f(TypePair<TW, TW>{});
    return cudaErrorInvalidValue;
  });
}

constexpr int kWordsPerWarp = 8;  // words (of 32 columns) a warp handles per step
constexpr int kElementwiseThreads = 256;

int elementwise_blocks(int64_t rows, int64_t cols) {
  const int64_t warps = rows * ceil_div<int64_t>(mask_words(cols), kWordsPerWarp);
  const int64_t blocks = ceil_div<int64_t>(warps * 32, kElementwiseThreads);
  return static_cast<int>(blocks < 8192 ? (blocks > 0 ? blocks : 1) : 8192);  // grid-stride past that
}

template <typename TW, typename TS>
__global__ void __launch_bounds__(kElementwiseThreads) mask_apply_kernel(const MaskApplyArgs a) {
  const TW* w = static_cast<const TW*>(a.weight);
  const TS* s = static_cast<const TS*>(a.scores);
  TW* w_eff = static_cast<TW*>(a.w_eff);
  const int64_t words = mask_words(a.cols), groups = ceil_div<int64_t>(words, kWordsPerWarp);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t g = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; g < a.rows * groups; g += warps) {
    const int64_t row = g / groups, w0 = (g % groups) * kWordsPerWarp, base = row * a.cols;
    bool keep[kWordsPerWarp];
    TW wv[kWordsPerWarp];
#pragma unroll
    for (int q = 0; q < kWordsPerWarp; ++q) {  // all loads first, so they are in flight together
      const int64_t c = (w0 + q) * 32 + lane;
      const bool valid = w0 + q < words && c < a.cols;
      if (s)
        keep[q] = valid && to_float(s[base + c]) > a.threshold;
      else
        keep[q] = valid && ((a.bits_in[row * words + w0 + q] >> lane) & 1);
      wv[q] = (w_eff && valid) ? w[base + c] : from_float<TW>(0.f);
    }
#pragma unroll
    for (int q = 0; q < kWordsPerWarp; ++q) {
      const unsigned word = __ballot_sync(0xffffffffu, keep[q]);
      if (w0 + q >= words) continue;  // warp-uniform
      const int64_t c = (w0 + q) * 32 + lane;
      if (a.bits_out && lane == 0) a.bits_out[row * words + w0 + q] = static_cast<int32_t>(word);
      if (w_eff && c < a.cols) w_eff[base + c] = keep[q] ? wv[q] : from_float<TW>(0.f);
    }
  }
}

template <typename TW, typename TS>
__global__ void __launch_bounds__(kElementwiseThreads) mask_ste_kernel(const MaskSteArgs a) {
  const TW* g = static_cast<const TW*>(a.grad_w_eff);
  const TW* w = static_cast<const TW*>(a.weight);
  TS* ds = static_cast<TS*>(a.d_scores);
  TW* dw = static_cast<TW*>(a.d_weight);
  const int64_t words = mask_words(a.cols), groups = ceil_div<int64_t>(words, kWordsPerWarp);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t gi = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; gi < a.rows * groups; gi += warps) {
    const int64_t row = gi / groups, w0 = (gi % groups) * kWordsPerWarp, base = row * a.cols;
#pragma unroll
    for (int q = 0; q < kWordsPerWarp; ++q) {
      const int64_t c = (w0 + q) * 32 + lane;
      if (w0 + q >= words || c >= a.cols) continue;
      const float grad = to_float(g[base + c]);
      if (ds) ds[base + c] = from_float<TS>(grad * to_float(w[base + c]));
      if (dw) dw[base + c] = from_float<TW>(((a.bits[row * words + w0 + q] >> lane) & 1) ? grad : 0.f);
    }
  }
}

constexpr int kMvWarps = 8;
constexpr int kMvRowsPerWarp = 2;
constexpr int kMvChunk = 1024;  // columns of x staged per step
constexpr int kMvRowsPerBlock = kMvWarps * kMvRowsPerWarp;

// Applies 8 mask bits starting at column k (a multiple of 8) of row `row_bits` to v.
__device__ __forceinline__ void apply_bits8(float (&v)[8], const int32_t* row_bits, int64_t k) {
  const uint32_t b8 = (static_cast<uint32_t>(row_bits[k >> 5]) >> (k & 31)) & 0xffu;
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = (b8 >> e) & 1u ? v[e] : 0.f;
}

// Minimum CTAs per SM for __launch_bounds__: the most each variant's registers allow (bits ~92 -> 2,
// float32 scores ~70 -> 3, 16-bit scores 64 -> 4). Told nothing, ptxas spilled <float, float, false>
// to fit 4 CTAs' 64 registers.
template <typename TS, bool kBits> constexpr int kMvMinBlocks = kBits ? 2 : sizeof(TS) == 4 ? 3 : 4;

template <typename T, typename TS, bool kBits>
__global__ void __launch_bounds__(kMvWarps * 32, (kMvMinBlocks<TS, kBits>))
    masked_matvec_kernel(const MaskedMatvecArgs a, bool vec_w) {
  PEFTKERN_DYNAMIC_SMEM(kMaskedMatvecMaxTokens * kMvChunk * int(sizeof(T)));  // at the most tokens
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [tokens][kMvChunk]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const TS* s = static_cast<const TS*>(a.scores);
  const int64_t words = mask_words(a.n_in);
  const int64_t row0 = (int64_t(blockIdx.x) * kMvWarps + warp) * kMvRowsPerWarp;
  const bool per_token = kBits && a.task_ids != nullptr;

  float acc[kMvRowsPerWarp][kMaskedMatvecMaxTokens] = {};
  for (int64_t k0 = 0; k0 < a.n_in; k0 += kMvChunk) {
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < a.tokens * kMvChunk; i += blockDim.x) {
      const int t = i / kMvChunk, c = i % kMvChunk;
      xs[i] = k0 + c < a.n_in ? x[t * a.n_in + k0 + c] : from_float<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kMvRowsPerWarp; ++rr) {
      const int64_t n = row0 + rr;
      if (n >= a.n_out) continue;  // warp-uniform
      for (int c = lane * 8; c < kMvChunk; c += 32 * 8) {
        const int64_t k = k0 + c;
        if (k >= a.n_in) break;
        const int valid = a.n_in - k < 8 ? static_cast<int>(a.n_in - k) : 8;
        float wv[8];
        load8(w + n * a.n_in + k, wv, vec_w, valid);
        if constexpr (!kBits) {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            wv[e] = (e < valid && to_float(s[n * a.n_in + k + e]) > a.threshold) ? wv[e] : 0.f;
        } else if (!per_token) {
          apply_bits8(wv, a.bits + n * words, k);
        }
#pragma unroll
        for (int t = 0; t < kMaskedMatvecMaxTokens; ++t) {
          if (t >= a.tokens) break;
          float we[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) we[e] = wv[e];
          if (per_token) {
            const int64_t task = a.task_ids[t];
            if (task >= 0 && task < a.tasks) apply_bits8(we, a.bits + (task * a.n_out + n) * words, k);
          }
          const T* xt = xs + t * kMvChunk + c;
          float sum = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) sum += to_float(xt[e]) * we[e];
          acc[rr][t] += sum;
        }
      }
    }
  }
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int rr = 0; rr < kMvRowsPerWarp; ++rr) {
    const int64_t n = row0 + rr;
#pragma unroll
    for (int t = 0; t < kMaskedMatvecMaxTokens; ++t) {
      if (t >= a.tokens) break;  // uniform: every lane reduces
      float v = acc[rr][t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && n < a.n_out) out[t * a.n_out + n] = from_float<T>(v + (bias ? to_float(bias[n]) : 0.f));
    }
  }
}

}  // namespace

cudaError_t mask_apply(const MaskApplyArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if ((!a.scores && !a.bits_in) || (a.w_eff && !a.weight)) return cudaErrorInvalidValue;
  return dispatch_weight_scores(a.w_dtype, a.s_dtype, [&](auto pair) {
    using P = decltype(pair);
    mask_apply_kernel<typename P::w, typename P::s>
        <<<elementwise_blocks(a.rows, a.cols), kElementwiseThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t mask_ste_backward(const MaskSteArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0 || (!a.d_scores && !a.d_weight)) return cudaSuccess;
  if (a.d_weight && !a.bits) return cudaErrorInvalidValue;
  return dispatch_weight_scores(a.w_dtype, a.s_dtype, [&](auto pair) {
    using P = decltype(pair);
    mask_ste_kernel<typename P::w, typename P::s>
        <<<elementwise_blocks(a.rows, a.cols), kElementwiseThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t masked_matvec(const MaskedMatvecArgs& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.n_out == 0) return cudaSuccess;
  if (a.tokens > kMaskedMatvecMaxTokens || a.n_in < 1 || (!a.scores && !a.bits)) return cudaErrorInvalidValue;
  return dispatch_weight_scores(a.dtype, a.scores ? a.s_dtype : a.dtype, [&](auto pair) -> cudaError_t {
    using T = typename decltype(pair)::w;
    using TS = typename decltype(pair)::s;
    const int smem_bytes = static_cast<int>(a.tokens * kMvChunk * sizeof(T));
    const bool vec_w = a.n_in % kVec<T> == 0 && is_aligned16(a.weight);
    const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(a.n_out, kMvRowsPerBlock));
    cudaError_t err;
    if (a.scores) {
      auto kernel = masked_matvec_kernel<T, TS, false>;
      if ((err = set_smem_limit(kernel, smem_bytes)) != cudaSuccess) return err;
      kernel<<<blocks, kMvWarps * 32, smem_bytes, stream>>>(a, vec_w);
    } else {
      auto kernel = masked_matvec_kernel<T, T, true>;
      if ((err = set_smem_limit(kernel, smem_bytes)) != cudaSuccess) return err;
      kernel<<<blocks, kMvWarps * 32, smem_bytes, stream>>>(a, vec_w);
    }
    return cudaGetLastError();
  });
}

}  // namespace peftkern::kernels
