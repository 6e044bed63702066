// Building blocks of the low-rank kernels: the row-block geometry, the rank padding, in-kernel
// dropout, and the pipelined product of a 64-row block of a [rows, K] matrix with a rank-r weight.
#pragma once

#include <algorithm>
#include <utility>

#include "common.cuh"
#include "dispatch.cuh"
#include "lowrank.h"
#include "philox.h"

namespace peftkern::cuda {

// Row-block kernels: 4 warps, each owning 16 of the block's 64 rows.
constexpr int kRowWarps = 4;
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kRowBlock = kRowWarps * 16;
static_assert(kRowBlock == kernels::kLowRankRowsPerBlock, "lowrank.h promises 64-row blocks");

// r is padded on chip to 16, 32, 64, 128 or 256 (zero rows/columns), so each size has one compiled
// kernel: f(IntTag<RP>{}) for r's padded rank RP (r <= 256).
template <typename F> cudaError_t dispatch_padded_rank(int r, F&& f) {
  return dispatch_bucket<16, 32, 64, 128, 256>(r, std::forward<F>(f));
}

// Per-warp float32 scratch where an accumulator fragment is stored for its element-wise epilogue.
constexpr int kScratchLd = 20;  // 16 columns + 4 floats: 16-byte rows, fewer bank conflicts
constexpr int kScratchBytes = kRowWarps * 16 * kScratchLd * 4;

// ------------------------------------------------------------------ dropout

// Multiplies a ROWS x COLS shared tile holding x[rows(i), col0..] by its dropout factors
// (col0 % 4 == 0). Elements outside x are zero and stay zero.
template <typename T, int ROWS, int COLS, int SLD, int NTHREADS, typename RowMap>
__device__ __forceinline__ void dropout_tile(T* tile, RowMap rows, int64_t col0, kernels::SeedOffset so, float p) {
  static_assert(COLS % 4 == 0, "dropout groups four columns");
  constexpr int kGroups = COLS / 4;
  for (int i = threadIdx.x; i < ROWS * kGroups; i += NTHREADS) {
    const int r = i / kGroups, c = (i % kGroups) * 4;
    const int64_t row = rows(r);
    if (row < 0) continue;
    float f[4];
    dropout_factors4(so.seed, so.offset, row, (col0 + c) / 4, p, f);
#pragma unroll
    for (int e = 0; e < 4; ++e) tile[r * SLD + c + e] = from_float<T>(to_float(tile[r * SLD + c + e]) * f[e]);
  }
}

// ------------------------------------------------------------------ row-block streamed product

// Shared-memory staging of stream_rows_times_weight: kStages x (A chunk + weight chunk).
template <typename T, int RP> struct StreamCfg {
  static constexpr int kBK = 32;  // K per stage
  static constexpr int kStages = 3;
  static constexpr int kLdA = kBK + kSmemPad<T>;
  static constexpr int kLdWrk = kBK + kSmemPad<T>;  // weight chunk stored [RP][kBK] (W is [r, K])
  static constexpr int kLdWkr = RP + kSmemPad<T>;   // weight chunk stored [kBK][RP] (W is [K, r])
  static constexpr int kStageElems = kRowBlock * kLdA + (RP * kLdWrk > kBK * kLdWkr ? RP * kLdWrk : kBK * kLdWkr);
  static constexpr int kBytes = kStages * round_up(kStageElems * int(sizeof(T)), 128);
  static constexpr int kStageStride = kBytes / kStages / int(sizeof(T));
};

// acc[j] = drop(A)[rows(0..63)] x W^T restricted to this warp's 16 rows and rank columns
// 16j..16j+16. A is [.., K] (x or grad_out), its block rows given by the row map; kWeightIsRK: W
// is [r, K] (w_down), else [K, r] (w_up). Rows mapped to -1 and rank columns past r read as zero;
// drop_p > 0 applies dropout to A. Ends with smem free for reuse.
template <typename T, int RP, bool kWeightIsRK, typename RowMap>
__device__ __forceinline__ void stream_rows_times_weight(typename Mma<T>::Acc (&acc)[RP / 16], const T* A, RowMap rows,
                                                         int K, const T* W, int r, T* smem, bool vec_a, bool vec_w,
                                                         float drop_p, kernels::SeedOffset so) {
  using C = StreamCfg<T, RP>;
  using M = Mma<T>;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < RP / 16; ++j) wmma::fill_fragment(acc[j], 0.f);

  const int nk = static_cast<int>(ceil_div<int64_t>(K, C::kBK));  // K + 31 would wrap near INT32_MAX
  auto a_stage = [&](int s) { return smem + s * C::kStageStride; };
  auto w_stage = [&](int s) { return smem + s * C::kStageStride + kRowBlock * C::kLdA; };
  auto load = [&](int kc, int s) {
    const int64_t k0 = int64_t(kc) * C::kBK;
    load_tile<T, kRowBlock, C::kBK, C::kLdA, kRowThreads>(a_stage(s), A, K, rows, k0, K, vec_a);
    if constexpr (kWeightIsRK)
      load_tile<T, RP, C::kBK, C::kLdWrk, kRowThreads>(w_stage(s), W, K, RowRange{0, r}, k0, K, vec_w);
    else
      load_tile<T, C::kBK, RP, C::kLdWkr, kRowThreads>(w_stage(s), W, r, RowRange{k0, K}, 0, r, vec_w);
  };

  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < nk) load(s, s);
    cp_async_commit();
  }
  for (int kc = 0; kc < nk; ++kc) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage kc landed for everyone; stage kc-1 is free for the prefetch
    const int pf = kc + C::kStages - 1;
    if (pf < nk) load(pf, pf % C::kStages);
    cp_async_commit();
    if (drop_p > 0.f) {
      dropout_tile<T, kRowBlock, C::kBK, C::kLdA, kRowThreads>(a_stage(kc % C::kStages), rows, int64_t(kc) * C::kBK, so,
                                                               drop_p);
      __syncthreads();
    }

    const T* a = a_stage(kc % C::kStages) + warp * 16 * C::kLdA;
    const T* w = w_stage(kc % C::kStages);
    // float32 at RP = 256 (acc alone is 128 registers): the 4 k steps not unrolled, so one step's
    // split hi/lo fragments are live next to acc (unrolled, it spilled). Others: unrolled.
#pragma unroll(std::is_same_v<T, float> && RP >= 256 ? 1 : C::kBK / M::kK)
    for (int k = 0; k < C::kBK; k += M::kK) {
      typename M::template A<wmma::row_major> fa;
      fa.load(a + k, C::kLdA);
#pragma unroll
      for (int j = 0; j < RP / 16; ++j) {
        if constexpr (kWeightIsRK) {
          typename M::template B<wmma::col_major> fb;
          fb.load(w + b_at<wmma::col_major>(k, j * 16, C::kLdWrk), C::kLdWrk);
          M::mma(acc[j], fa, fb);
        } else {
          typename M::template B<wmma::row_major> fb;
          fb.load(w + b_at<wmma::row_major>(k, j * 16, C::kLdWkr), C::kLdWkr);
          M::mma(acc[j], fa, fb);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
}

}  // namespace peftkern::cuda
