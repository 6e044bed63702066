// Fused low-rank update backward (see lowrank.h for the passes): the kernels and their per-dtype
// launch. Included by lowrank_backward.cu (the dtype dispatch) and lowrank_backward_{f32,f16,bf16}.cu,
// which compile one dtype each, so no translation unit holds all 33 kernel instances.
//   rows kernel    per 64-row block: dz = scale * g * (grad_out @ w_up) * act'(z), h = g * act(z)
//                  (g the per-row gate, 1 without); both written [rows, RP] (zero-padded) to the
//                  workspace; dgate = scale * rowsum((grad_out @ w_up) * act(z)) when asked
//   columns kernel per (BN-wide column block, row split), for each 32-row tile:
//                    columns of n_in:  dx         = mask * (dz @ w_down[:, cols]) (+ grad_out | + dx)
//                                      dW_down^T += drop(x)^T dz       (float32 partial, registers)
//                    columns of n_out: dW_up    += grad_out^T h        (float32 partial, registers)
//                                      bias sums of g * grad_out (and of dz in column block 0)
//   reduce kernel  sums the row splits' partials in a fixed order (deterministic), applies scale,
//                  casts, and writes dw_up, dw_down (transposed back), db_up, db_down
#pragma once

#include "lowrank.h"
#include "lowrank_tiles.cuh"

namespace peftkern::kernels::lowrank_backward_detail {

using namespace peftkern::cuda;


// ------------------------------------------------------------------ plan (host)

constexpr int kColsBM = 32;  // rows per tile of the columns kernel (the K of the weight products)
constexpr int kColsWarps = 4;
constexpr int kColsThreads = kColsWarps * 32;
constexpr size_t kAlign = 256;  // workspace buffers start on 256-byte boundaries

// Column block of the columns kernel (the one place the host plan and ColsCfg take it from), for
// rank RP and element size es: BN * RP = 4096 keeps the two weight-gradient accumulators at 64
// float32 registers per thread for 16-bit types. float32 takes BN * RP = 2048 (32 registers): its
// 3xTF32 operand fragments are twice as large (hi + lo), and with 64 it spilled at RP = 64, 128.
// BN is a multiple of 16 in 16..128 (RP = 256 float32 stays at 16, 64 registers).
constexpr int cols_block_n(int rp, int es) {
  const int bn = (es == 4 ? 2048 : 4096) / rp;
  return bn > 128 ? 128 : bn < 16 ? 16 : bn;
}

struct Plan {
  int rp, bn, splits;
  int64_t col_blocks, n_pad, tiles, tiles_per_split;
  bool need_dz, need_h;
  size_t dz, h, ws_dwu, ws_dwd, ws_dbu, ws_dbd, total;  // byte offsets; total = size
};

inline size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline Plan make_plan(const LowRankBackwardArgs& a) {
  Plan p{};
  // (r past the fused range is rejected by lowrank_backward; its plan is that of r = 256)
  dispatch_padded_rank(std::min(a.r, kLowRankMaxFusedRank), [&](auto rank) {
    p.rp = decltype(rank)::value;
    return cudaSuccess;
  });
  const size_t es = elem_size(a.dtype);
  p.bn = cols_block_n(p.rp, static_cast<int>(es));
  p.col_blocks = ceil_div<int64_t>(std::max(a.n_in, a.n_out), p.bn);
  p.n_pad = p.col_blocks * p.bn;
  p.tiles = ceil_div<int64_t>(a.rows, kColsBM);
  // Enough row splits for about two CTAs per SM; each split adds one partial to reduce.
  const int64_t want = ceil_div<int64_t>(2 * int64_t(a.num_sms > 0 ? a.num_sms : 1), p.col_blocks);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, p.tiles, 65535}));
  p.tiles_per_split = ceil_div<int64_t>(p.tiles, splits);
  p.splits = static_cast<int>(std::max<int64_t>(1, ceil_div<int64_t>(p.tiles, p.tiles_per_split)));
  p.need_dz = a.dx || a.dw_down || a.db_down;
  p.need_h = a.dw_up != nullptr;

  const size_t rank_buf = round_up(size_t(a.rows) * p.rp * es, kAlign);
  const size_t w_part = round_up(size_t(p.splits) * p.n_pad * p.rp * 4, kAlign);
  size_t off = 0;
  auto take = [&](bool need, size_t bytes) {
    const size_t at = off;
    off += need ? bytes : 0;
    return at;
  };
  p.dz = take(p.need_dz, rank_buf);
  p.h = take(p.need_h, rank_buf);
  p.ws_dwu = take(a.dw_up, w_part);
  p.ws_dwd = take(a.dw_down, w_part);
  p.ws_dbu = take(a.db_up, round_up(size_t(p.splits) * p.n_pad * 4, kAlign));
  p.ws_dbd = take(a.db_down, round_up(size_t(p.splits) * p.rp * 4, kAlign));
  p.total = off;
  return p;
}

// ------------------------------------------------------------------ rows kernel

struct RowsArgs {
  Activation activation;
  float scale;
  int64_t rows;
  int n_out, r;
  const void* grad_out;
  const void* z;
  const void* w_up;
  void* dz;  // [rows, RP] or null
  void* h;   // [rows, RP] or null
  bool vec_g, vec_wu;
  const void* gate;  // [rows] or null
  float* dgate;      // [rows] or null
};

template <typename T, int RP> constexpr int rows_smem_bytes() { return StreamCfg<T, RP>::kBytes + kScratchBytes; }

template <typename T, int RP>
__global__ void __launch_bounds__(kRowThreads) lowrank_backward_rows_kernel(const RowsArgs a) {
  using M = Mma<T>;
  PEFTKERN_DYNAMIC_SMEM((rows_smem_bytes<T, RP>()));
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* scr = reinterpret_cast<float*>(smem + StreamCfg<T, RP>::kBytes) + warp * 16 * kScratchLd;
  const int64_t m0 = int64_t(blockIdx.x) * kRowBlock;
  const T* z = static_cast<const T*>(a.z);
  T* dz_out = static_cast<T*>(a.dz);
  T* h_out = static_cast<T*>(a.h);
  const T* gate = static_cast<const T*>(a.gate);
  const bool need_gw = dz_out || a.dgate;  // grad_out @ w_up

  typename M::Acc acc[RP / 16];
  if (need_gw)
    stream_rows_times_weight<T, RP, false>(acc, static_cast<const T*>(a.grad_out), RowRange{m0, a.rows}, a.n_out,
                                           static_cast<const T*>(a.w_up), a.r, reinterpret_cast<T*>(smem), a.vec_g,
                                           a.vec_wu, 0.f, SeedOffset{0, 0});

  // Two lanes per row (8 of each 16 columns each); warp w owns rows m0 + 16 w .. + 15.
  const int rr = lane >> 1, c0 = (lane & 1) * 8;
  const int64_t grow = m0 + warp * 16 + rr;
  const float gv = (gate && grow < a.rows) ? to_float(gate[grow]) : 1.f;
  float dgate_part = 0.f;  // this lane's columns of rowsum((grad_out @ w_up) * act(z))
#pragma unroll
  for (int j = 0; j < RP / 16; ++j) {
    if (need_gw) {
      wmma::store_matrix_sync(scr, acc[j], kScratchLd, wmma::mem_row_major);
      __syncwarp();
    }
    if (grow < a.rows) {
      float dzv[8], hv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int col = j * 16 + c0 + e;
        const bool valid = col < a.r;
        const float zv = valid ? to_float(z[grow * a.r + col]) : 0.f;
        const float gw = (valid && need_gw) ? scr[rr * kScratchLd + c0 + e] : 0.f;
        const float act = valid ? activation_fn(a.activation, zv) : 0.f;
        dzv[e] = (valid && dz_out) ? a.scale * gv * gw * activation_grad(a.activation, zv) : 0.f;
        hv[e] = gv * act;
        dgate_part += gw * act;
      }
      const int64_t at = grow * RP + j * 16 + c0;
      if (dz_out) store8<T>(dz_out + at, dzv, true, 8);
      if (h_out) store8<T>(h_out + at, hv, true, 8);
    }
    __syncwarp();
  }
  if (a.dgate) {  // every lane shuffles (rows past the end hold 0); the even lane of a pair writes
    dgate_part += __shfl_xor_sync(0xffffffffu, dgate_part, 1);
    if ((lane & 1) == 0 && grow < a.rows) a.dgate[grow] = a.scale * dgate_part;
  }
}

// ------------------------------------------------------------------ columns kernel

struct ColsArgs {
  int64_t rows;
  int n_in, n_out, r;
  int64_t tiles, tiles_per_split, n_pad;
  const void* grad_out;
  const void* x;
  const void* dz;  // [rows, RP]
  const void* h;   // [rows, RP]
  const void* w_down;
  void* dx;
  DxMode dx_mode;
  float drop_p;
  const int64_t* seed_offset;
  float* ws_dwu;  // [splits, n_pad, RP] partial grad_out^T h, or null
  float* ws_dwd;  // [splits, n_pad, RP] partial drop(x)^T dz (dW_down transposed), or null
  float* ws_dbu;  // [splits, n_pad], or null
  float* ws_dbd;  // [splits, RP], or null
  bool vec_g, vec_x, vec_dx, vec_wd;
  const void* gate;  // [rows] per-row gate weighting the bias sums of grad_out, or null
};

template <typename T, int RP> struct ColsCfg {
  static constexpr int kBN = cols_block_n(RP, int(sizeof(T)));
  static constexpr int kStages = RP <= 64 ? 3 : 2;
  static constexpr int kLdN = kBN + kSmemPad<T>;
  static constexpr int kLdR = RP + kSmemPad<T>;
  // one stage: grad_out and x tiles [kColsBM x kBN], dz and h tiles [kColsBM x RP]
  static constexpr int kGOff = 0, kXOff = kColsBM * kLdN, kDzOff = 2 * kColsBM * kLdN,
                       kHOff = 2 * kColsBM * kLdN + kColsBM * kLdR;
  static constexpr int kStageElems = 2 * kColsBM * kLdN + 2 * kColsBM * kLdR;
  static constexpr int kStageBytes = round_up(kStageElems * int(sizeof(T)), 128);
  static constexpr int kWdBytes = round_up(RP * kLdN * int(sizeof(T)), 128);
  static constexpr int kSmemBytes = kWdBytes + kStages * kStageBytes + kScratchBytes;
  static constexpr int kWgFrags = (kBN / 16) * (RP / 16);  // per weight-gradient product
  static constexpr int kWgFragsPerWarp = kWgFrags / kColsWarps;
  static constexpr int kDxFrags = (kColsBM / 16) * (kBN / 16);
  static_assert(kWgFrags % kColsWarps == 0, "weight-gradient fragments split evenly over warps");
  static_assert(kSmemBytes <= 227 * 1024, "low-rank backward: shared memory over the sm_90 limit (smaller devices: lowrank_fused)");
  // Minimum CTAs per SM for __launch_bounds__: as many as the shared memory allows on sm_90 (228 KB,
  // 1 KB reserved per CTA), at most 3 (RP <= 64) or 2 (RP >= 128 needs ~200 registers). Told nothing,
  // ptxas spilled a few values to reach 3 or 4 CTAs' registers that the shared memory rules out.
  static constexpr int kSmemCtas = (228 * 1024) / (kSmemBytes + 1024);
  static constexpr int kMaxCtas = RP <= 64 ? 3 : 2;
  static constexpr int kMinBlocks = kSmemCtas < 1 ? 1 : kSmemCtas < kMaxCtas ? kSmemCtas : kMaxCtas;
};

// acc[q] += (a_s^T)(column block ni) x b_s(rank block ri) over the tile's kColsBM rows, for this
// warp's fragments f = warp * kWgFragsPerWarp + q (ni = f / (RP / 16), ri = f % (RP / 16)).
// One product at a time, k not unrolled: only one k step's operand fragments are live next to the
// accumulators (the fully unrolled q x k nest of both products hoisted them all and spilled).
template <typename T, int RP>
__device__ __forceinline__ void wg_accumulate(typename Mma<T>::Acc (&acc)[ColsCfg<T, RP>::kWgFragsPerWarp],
                                              const T* a_s, const T* b_s, int warp) {
  using C = ColsCfg<T, RP>;
  using M = Mma<T>;
#pragma unroll 1
  for (int k = 0; k < kColsBM; k += M::kK) {
#pragma unroll
    for (int q = 0; q < C::kWgFragsPerWarp; ++q) {
      const int f = warp * C::kWgFragsPerWarp + q;
      const int ni = f / (RP / 16), ri = f % (RP / 16);
      typename M::template A<wmma::col_major> fa;  // A(n, k) = a_s tile [k][n]
      fa.load(a_s + a_at<wmma::col_major>(ni * 16, k, C::kLdN), C::kLdN);
      typename M::template B<wmma::row_major> fb;
      fb.load(b_s + b_at<wmma::row_major>(k, ri * 16, C::kLdR), C::kLdR);
      M::mma(acc[q], fa, fb);
    }
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kColsThreads, (ColsCfg<T, RP>::kMinBlocks))
    lowrank_backward_cols_kernel(const ColsArgs a) {
  using C = ColsCfg<T, RP>;
  using M = Mma<T>;
  PEFTKERN_DYNAMIC_SMEM(C::kSmemBytes);
  extern __shared__ __align__(128) unsigned char smem[];
  T* wd_s = reinterpret_cast<T*>(smem);
  auto stage = [&](int s) { return reinterpret_cast<T*>(smem + C::kWdBytes + s * C::kStageBytes); };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* scr = reinterpret_cast<float*>(smem + C::kWdBytes + C::kStages * C::kStageBytes) + warp * 16 * kScratchLd;

  const int64_t n0 = int64_t(blockIdx.x) * C::kBN;
  const int split = blockIdx.y;
  const int64_t t0 = split * a.tiles_per_split;
  const int64_t t1 = t0 + a.tiles_per_split < a.tiles ? t0 + a.tiles_per_split : a.tiles;
  const T* g = static_cast<const T*>(a.grad_out);
  const T* x = static_cast<const T*>(a.x);
  const T* dz = static_cast<const T*>(a.dz);
  const T* h = static_cast<const T*>(a.h);
  T* dx = static_cast<T*>(a.dx);
  const bool in_cols = n0 < a.n_in, out_cols = n0 < a.n_out;
  const SeedOffset so =
      a.drop_p > 0.f ? SeedOffset{uint64_t(a.seed_offset[0]), uint64_t(a.seed_offset[1])} : SeedOffset{0, 0};

  const bool need_dx = dx != nullptr && in_cols;
  const bool need_dwd = a.ws_dwd != nullptr && in_cols;
  const bool need_dwu = a.ws_dwu != nullptr && out_cols;
  const bool need_dbu = a.ws_dbu != nullptr && out_cols;
  const bool need_dbd = a.ws_dbd != nullptr && blockIdx.x == 0;
  const bool plus_g = a.dx_mode == DxMode::kWritePlusGradOut;
  const bool need_g = need_dwu || need_dbu || (need_dx && plus_g);
  const bool need_dz = need_dx || need_dwd || need_dbd;

  if (need_dx)
    load_tile<T, RP, C::kBN, C::kLdN, kColsThreads>(wd_s, static_cast<const T*>(a.w_down), a.n_in, RowRange{0, a.r}, n0,
                                                    a.n_in, a.vec_wd);
  auto load_stage = [&](int64_t t, int s) {
    const RowRange rows{t * kColsBM, a.rows};
    T* st = stage(s);
    if (need_g)
      load_tile<T, kColsBM, C::kBN, C::kLdN, kColsThreads>(st + C::kGOff, g, a.n_out, rows, n0, a.n_out, a.vec_g);
    if (need_dwd)
      load_tile<T, kColsBM, C::kBN, C::kLdN, kColsThreads>(st + C::kXOff, x, a.n_in, rows, n0, a.n_in, a.vec_x);
    if (need_dz) load_tile<T, kColsBM, RP, C::kLdR, kColsThreads>(st + C::kDzOff, dz, RP, rows, 0, RP, true);
    if (need_dwu) load_tile<T, kColsBM, RP, C::kLdR, kColsThreads>(st + C::kHOff, h, RP, rows, 0, RP, true);
  };

  typename M::Acc acc_u[C::kWgFragsPerWarp], acc_d[C::kWgFragsPerWarp];
#pragma unroll
  for (int q = 0; q < C::kWgFragsPerWarp; ++q) {
    wmma::fill_fragment(acc_u[q], 0.f);
    wmma::fill_fragment(acc_d[q], 0.f);
  }
  float dbu_sum = 0.f;                             // column n0 + threadIdx.x
  float dbd_sum[ceil_div(RP, kColsThreads)] = {};  // columns threadIdx.x + i * 128

  for (int s = 0; s < C::kStages - 1; ++s) {
    if (t0 + s < t1) load_stage(t0 + s, s);
    cp_async_commit();
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int i = static_cast<int>(t - t0);
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    if (t + C::kStages - 1 < t1) load_stage(t + C::kStages - 1, (i + C::kStages - 1) % C::kStages);
    cp_async_commit();
    T* st = stage(i % C::kStages);
    const T* g_s = st + C::kGOff;
    T* x_s = st + C::kXOff;
    const T* dz_s = st + C::kDzOff;
    const T* h_s = st + C::kHOff;
    if (need_dwd && a.drop_p > 0.f) {
      dropout_tile<T, kColsBM, C::kBN, C::kLdN, kColsThreads>(x_s, RowRange{t * kColsBM, a.rows}, n0, so, a.drop_p);
      __syncthreads();
    }

    if (need_dx) {
      for (int f = warp; f < C::kDxFrags; f += kColsWarps) {
        const int mi = f / (C::kBN / 16), ni = f % (C::kBN / 16);
        typename M::Acc acc;
        wmma::fill_fragment(acc, 0.f);
        // unrolled by 2 only: fully unrolled, all k steps' fragments were loaded ahead, live next to
        // acc_u/acc_d (they spilled)
#pragma unroll 2
        for (int k = 0; k < RP; k += M::kK) {
          typename M::template A<wmma::row_major> fa;
          fa.load(dz_s + a_at<wmma::row_major>(mi * 16, k, C::kLdR), C::kLdR);
          typename M::template B<wmma::row_major> fb;  // B(k, n) = w_down[k][n0 + n]
          fb.load(wd_s + b_at<wmma::row_major>(k, ni * 16, C::kLdN), C::kLdN);
          M::mma(acc, fa, fb);
        }
        wmma::store_matrix_sync(scr, acc, kScratchLd, wmma::mem_row_major);
        __syncwarp();
        const int rr = lane >> 1, c0 = (lane & 1) * 8;
        const int64_t grow = t * kColsBM + mi * 16 + rr;
        const int64_t gcol = n0 + ni * 16 + c0;
        const int64_t left = a.n_in - gcol;
        if (grow < a.rows && left > 0) {
          const int valid = left < 8 ? int(left) : 8;
          float f8[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) f8[e] = 1.f;
          if (a.drop_p > 0.f) {
            float f4[4];
            dropout_factors4(so.seed, so.offset, grow, gcol / 4, a.drop_p, f4);
#pragma unroll
            for (int e = 0; e < 4; ++e) f8[e] = f4[e];
            dropout_factors4(so.seed, so.offset, grow, gcol / 4 + 1, a.drop_p, f4);
#pragma unroll
            for (int e = 0; e < 4; ++e) f8[4 + e] = f4[e];
          }
          T* dst = dx + grow * a.n_in + gcol;
          float v[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            float base = 0.f;
            if (e < valid) {
              if (plus_g)
                base = to_float(g_s[(mi * 16 + rr) * C::kLdN + ni * 16 + c0 + e]);
              else if (a.dx_mode == DxMode::kAccumulate)
                base = to_float(dst[e]);
            }
            v[e] = base + f8[e] * scr[rr * kScratchLd + c0 + e];
          }
          store8<T>(dst, v, a.vec_dx, valid);
        }
        __syncwarp();
      }
    }

    if (need_dwu) wg_accumulate<T, RP>(acc_u, g_s, h_s, warp);   // += grad_out^T h
    if (need_dwd) wg_accumulate<T, RP>(acc_d, x_s, dz_s, warp);  // += drop(x)^T dz

    if (need_dbu && threadIdx.x < C::kBN) {
      const T* gate = static_cast<const T*>(a.gate);
      for (int rrow = 0; rrow < kColsBM; ++rrow) {
        const int64_t row = t * kColsBM + rrow;  // rows past the end are zeros in the tile
        const float w = gate ? (row < a.rows ? to_float(gate[row]) : 0.f) : 1.f;
        dbu_sum += w * to_float(g_s[rrow * C::kLdN + threadIdx.x]);
      }
    }
    if (need_dbd) {
#pragma unroll
      for (int q = 0; q < ceil_div(RP, kColsThreads); ++q) {
        const int c = threadIdx.x + q * kColsThreads;
        if (c < RP)
          for (int rrow = 0; rrow < kColsBM; ++rrow) dbd_sum[q] += to_float(dz_s[rrow * C::kLdR + c]);
      }
    }
    __syncthreads();  // stage i is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // Partials of this split; rows past n_in / n_out hold zeros and are ignored by the reduction.
  const int64_t w_off = int64_t(split) * a.n_pad * RP;
#pragma unroll
  for (int q = 0; q < C::kWgFragsPerWarp; ++q) {
    const int f = warp * C::kWgFragsPerWarp + q;
    const int ni = f / (RP / 16), ri = f % (RP / 16);
    const int64_t at = w_off + (n0 + ni * 16) * RP + ri * 16;
    if (need_dwu) wmma::store_matrix_sync(a.ws_dwu + at, acc_u[q], RP, wmma::mem_row_major);
    if (need_dwd) wmma::store_matrix_sync(a.ws_dwd + at, acc_d[q], RP, wmma::mem_row_major);
  }
  if (need_dbu && threadIdx.x < C::kBN) a.ws_dbu[int64_t(split) * a.n_pad + n0 + threadIdx.x] = dbu_sum;
  if (need_dbd) {
#pragma unroll
    for (int q = 0; q < ceil_div(RP, kColsThreads); ++q) {
      const int c = threadIdx.x + q * kColsThreads;
      if (c < RP) a.ws_dbd[int64_t(split) * RP + c] = dbd_sum[q];
    }
  }
}

// ------------------------------------------------------------------ reduce kernel

struct ReduceArgs {
  int n_in, n_out, r, rp, splits;
  int64_t n_pad;
  float scale;
  const float *ws_dwu, *ws_dwd, *ws_dbu, *ws_dbd;
  void *dw_up, *dw_down, *db_up, *db_down;
};

constexpr int kReduceThreads = 256;

template <typename T> __global__ void __launch_bounds__(kReduceThreads) lowrank_backward_reduce_kernel(const ReduceArgs a) {
  const int64_t n_wu = int64_t(a.n_out) * a.r, n_wd = int64_t(a.n_in) * a.r;
  const int64_t total = n_wu + n_wd + a.n_out + a.r;
  const int64_t split_w = a.n_pad * a.rp;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    if (i < n_wu) {  // dw_up[n][k] = scale * sum_p ws_dwu[p][n][k]
      if (!a.dw_up) continue;
      const int64_t n = i / a.r, k = i % a.r;
      for (int p = 0; p < a.splits; ++p) s += a.ws_dwu[p * split_w + n * a.rp + k];
      static_cast<T*>(a.dw_up)[i] = from_float<T>(a.scale * s);
    } else if (i < n_wu + n_wd) {  // dw_down[k][n] = sum_p ws_dwd[p][n][k]
      if (!a.dw_down) continue;
      const int64_t j = i - n_wu, n = j / a.r, k = j % a.r;
      for (int p = 0; p < a.splits; ++p) s += a.ws_dwd[p * split_w + n * a.rp + k];
      static_cast<T*>(a.dw_down)[k * a.n_in + n] = from_float<T>(s);
    } else if (i < n_wu + n_wd + a.n_out) {
      if (!a.db_up) continue;
      const int64_t n = i - n_wu - n_wd;
      for (int p = 0; p < a.splits; ++p) s += a.ws_dbu[p * a.n_pad + n];
      static_cast<T*>(a.db_up)[n] = from_float<T>(a.scale * s);
    } else {
      if (!a.db_down) continue;
      const int64_t k = i - n_wu - n_wd - a.n_out;
      for (int p = 0; p < a.splits; ++p) s += a.ws_dbd[int64_t(p) * a.rp + k];
      static_cast<T*>(a.db_down)[k] = from_float<T>(s);
    }
  }
}

inline cudaError_t zero_weight_grads(const LowRankBackwardArgs& a, cudaStream_t stream) {
  const size_t es = elem_size(a.dtype);
  const std::pair<void*, size_t> outs[] = {{a.dw_down, size_t(a.r) * a.n_in},
                                           {a.db_down, size_t(a.r)},
                                           {a.dw_up, size_t(a.n_out) * a.r},
                                           {a.db_up, size_t(a.n_out)}};
  for (const auto& [ptr, n] : outs)
    if (ptr) {
      const cudaError_t err = cudaMemsetAsync(ptr, 0, n * es, stream);
      if (err != cudaSuccess) return err;
    }
  return cudaSuccess;
}

// The passes of lowrank_backward for element type T (explicitly instantiated, one dtype per .cu).
template <typename T>
cudaError_t launch(const LowRankBackwardArgs& a, const Plan& p, unsigned char* ws, bool any_weight_grad,
                   cudaStream_t stream) {
  return dispatch_padded_rank(a.r, [&](auto rank) -> cudaError_t {
    constexpr int RP = decltype(rank)::value;
    constexpr int V = kVec<T>;
    const bool in_vec = a.n_in % V == 0, out_vec = a.n_out % V == 0;
    cudaError_t err;

    if (p.need_dz || p.need_h || a.dgate) {
      const RowsArgs ra{a.activation,
                        a.scale,
                        a.rows,
                        a.n_out,
                        a.r,
                        a.grad_out,
                        a.z,
                        a.w_up,
                        p.need_dz ? ws + p.dz : nullptr,
                        p.need_h ? ws + p.h : nullptr,
                        out_vec && is_aligned16(a.grad_out),
                        a.r % V == 0 && is_aligned16(a.w_up),
                        a.gate,
                        a.dgate};
      auto kernel = lowrank_backward_rows_kernel<T, RP>;
      constexpr int smem_bytes = rows_smem_bytes<T, RP>();
      if ((err = set_smem_limit(kernel, smem_bytes)) != cudaSuccess) return err;
      const int64_t blocks = ceil_div<int64_t>(a.rows, kRowBlock);
      kernel<<<static_cast<unsigned>(blocks), kRowThreads, smem_bytes, stream>>>(ra);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (!a.dx && !any_weight_grad) return cudaSuccess;  // dgate alone: the rows kernel was all

    using C = ColsCfg<T, RP>;
    const ColsArgs ca{a.rows,
                      a.n_in,
                      a.n_out,
                      a.r,
                      p.tiles,
                      p.tiles_per_split,
                      p.n_pad,
                      a.grad_out,
                      a.x,
                      ws + p.dz,
                      ws + p.h,
                      a.w_down,
                      a.dx,
                      a.dx_mode,
                      a.dropout.p,
                      a.dropout.seed_offset,
                      a.dw_up ? reinterpret_cast<float*>(ws + p.ws_dwu) : nullptr,
                      a.dw_down ? reinterpret_cast<float*>(ws + p.ws_dwd) : nullptr,
                      a.db_up ? reinterpret_cast<float*>(ws + p.ws_dbu) : nullptr,
                      a.db_down ? reinterpret_cast<float*>(ws + p.ws_dbd) : nullptr,
                      out_vec && is_aligned16(a.grad_out),
                      in_vec && is_aligned16(a.x),
                      in_vec && is_aligned16(a.dx),
                      in_vec && is_aligned16(a.w_down),
                      a.gate};
    auto cols = lowrank_backward_cols_kernel<T, RP>;
    if ((err = set_smem_limit(cols, C::kSmemBytes)) != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(p.col_blocks), static_cast<unsigned>(p.splits));
    cols<<<grid, kColsThreads, C::kSmemBytes, stream>>>(ca);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    if (any_weight_grad) {
      const ReduceArgs ra{a.n_in,
                          a.n_out,
                          a.r,
                          p.rp,
                          p.splits,
                          p.n_pad,
                          a.scale,
                          reinterpret_cast<const float*>(ws + p.ws_dwu),
                          reinterpret_cast<const float*>(ws + p.ws_dwd),
                          reinterpret_cast<const float*>(ws + p.ws_dbu),
                          reinterpret_cast<const float*>(ws + p.ws_dbd),
                          a.dw_up,
                          a.dw_down,
                          a.db_up,
                          a.db_down};
      const int64_t total = (int64_t(a.n_in) + a.n_out) * a.r + a.n_out + a.r;
      const int64_t blocks =
          std::min<int64_t>(ceil_div<int64_t>(total, kReduceThreads), 8 * int64_t(a.num_sms > 0 ? a.num_sms : 1));
      lowrank_backward_reduce_kernel<T><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(ra);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

extern template cudaError_t launch<float>(const LowRankBackwardArgs&, const Plan&, unsigned char*, bool, cudaStream_t);
extern template cudaError_t launch<__half>(const LowRankBackwardArgs&, const Plan&, unsigned char*, bool, cudaStream_t);
extern template cudaError_t launch<__nv_bfloat16>(const LowRankBackwardArgs&, const Plan&, unsigned char*, bool,
                                                  cudaStream_t);

}  // namespace peftkern::kernels::lowrank_backward_detail
