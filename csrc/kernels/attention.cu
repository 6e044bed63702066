// Prefix attention (see attention.h), flash style: keys are visited block by block, first the
// prefix's (read from prefix_k/v of the sample's task), then the sequence's (read from k/v), with an
// online softmax in float32; nothing of size [B, H, P + S, D] exists.
//
// Tiles of 64 queries / 64 keys; 4 warps, each owning 16 rows of the block. Products on tensor cores
// (WMMA); S and P pass through shared memory (P must become an A operand); the output accumulators
// stay in registers and are rescaled per row through a row map probed from the accumulator layout
// at kernel start (so no undocumented fragment layout is assumed).
//
//   forward     per (query block, head, sample): out, lse
//   backward    delta = rowsum(dO * O); per (key block, kv head, sample): dK, dV (sequence keys) or
//               float32 per-sample partials (prefix keys); per (query block, head, sample): dQ; the
//               prefix partials summed over each task's samples in a fixed order.
#include <algorithm>

#include "attention.h"
#include "common.cuh"

namespace peftkern::kernels {
namespace {

using namespace peftkern::cuda;

constexpr int kBlk = 64;  // queries or keys per block
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

template <typename T, int D> struct Cfg {
  static constexpr int kLd = D + kSmemPad<T>;              // rows of Q/K/V/dO tiles
  static constexpr int kTile = kBlk * kLd;                 // elements of one [64 x D] tile
  static constexpr int kLdS = (D > kBlk ? D : kBlk) + 4;   // float32 scratch rows
  static constexpr int kScr = 16 * kLdS;                   // floats of one warp's scratch
  static constexpr int kLdP = kBlk + kSmemPad<T>;          // rows of a warp's P / dS tile
  static constexpr int kP = 16 * kLdP;
  static constexpr int kDF = D / 16;                       // 16-column fragments across D
};

// Which of the 16 rows each of a lane's 8 accumulator elements belongs to (probed, not assumed).
struct RowMap {
  int r[8];
};
template <typename T> __device__ RowMap probe_rows(float* scratch, int lane) {
  typename Mma<T>::Acc f;
  static_assert(sizeof(f.x) / sizeof(f.x[0]) == 8, "m16n16k16 float accumulator holds 8 elements per lane");
  for (int i = lane; i < 256; i += 32) scratch[i] = static_cast<float>(i >> 4);
  __syncwarp();
  wmma::load_matrix_sync(f, scratch, 16, wmma::mem_row_major);
  RowMap m;
#pragma unroll
  for (int i = 0; i < 8; ++i) m.r[i] = static_cast<int>(f.x[i]);
  __syncwarp();
  return m;
}

// scratch[16 x 64] (float32, row stride kLdS) = rows[16 x D] @ tile[64 x D]^T, both operands in
// shared memory with row stride kLd: a warp's 16 queries (or keys) against a block of 64 keys (or
// queries).
template <typename T, int D>
__device__ __forceinline__ void block_times_tile_t(float* scratch, const T* rows, const T* tile) {
  using C = Cfg<T, D>;
  using M = Mma<T>;
  typename M::Acc acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
#pragma unroll
  for (int d = 0; d < D; d += 16) {
    typename M::template A<wmma::row_major> fa;
    fa.load(rows + d, C::kLd);
#pragma unroll
    for (int f = 0; f < 4; ++f) {
      typename M::template B<wmma::col_major> fb;  // B(d, n) = tile[n][d]
      fb.load(tile + f * 16 * C::kLd + d, C::kLd);
      M::mma(acc[f], fa, fb);
    }
  }
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::store_matrix_sync(scratch + f * 16, acc[f], C::kLdS, wmma::mem_row_major);
}

// acc[16 x D] += p[16 x 64] (a warp's P or dS, row stride kLdP) @ tile[64 x D] (row stride kLd).
template <typename T, int D>
__device__ __forceinline__ void p_times_tile(typename Mma<T>::Acc (&acc)[D / 16], const T* p, const T* tile) {
  using C = Cfg<T, D>;
  using M = Mma<T>;
#pragma unroll
  for (int k = 0; k < kBlk; k += 16) {
    typename M::template A<wmma::row_major> fa;
    fa.load(p + k, C::kLdP);
#pragma unroll
    for (int f = 0; f < C::kDF; ++f) {
      typename M::template B<wmma::row_major> fb;  // B(k, d) = tile[k][d]
      fb.load(tile + k * C::kLd + f * 16, C::kLd);
      M::mma(acc[f], fa, fb);
    }
  }
}

// Writes a warp's 16 x D accumulators (times scale) through its scratch: row r goes to row_ptr(r)
// (float32 or T; null = skip), 8 columns per store.
template <typename T, int D, typename RowPtr>
__device__ __forceinline__ void write_rows(typename Mma<T>::Acc (&acc)[D / 16], float scale, float* scratch, int lane,
                                           RowPtr row_ptr) {
  using C = Cfg<T, D>;
#pragma unroll
  for (int f = 0; f < C::kDF; ++f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[f].x[e] *= scale;
    wmma::store_matrix_sync(scratch + f * 16, acc[f], C::kLdS, wmma::mem_row_major);
  }
  __syncwarp();
  constexpr int kVecs = D / 8;
  for (int idx = lane; idx < 16 * kVecs; idx += 32) {
    const int r = idx / kVecs, c = (idx % kVecs) * 8;
    auto* dst = row_ptr(r);
    if (dst == nullptr) continue;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = scratch[r * C::kLdS + c + e];
    store8(dst + c, v, true, 8);
  }
  __syncwarp();
}

// The keys of key block kb of sample b for kv head hk: the prefix's blocks first, then the sequence's.
template <typename T> struct KeySource {
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;  // row strides
  int64_t key0, nvalid;
  bool prefix;
};

template <typename T>
__device__ __forceinline__ KeySource<T> key_source(const PrefixAttentionArgs& a, int b, int hk, int kb, int n_prefix_blocks) {
  if (kb < n_prefix_blocks) {
    const int64_t task = a.prefix_ids ? a.prefix_ids[b] : 0;
    const int64_t off = (task * a.Hkv + hk) * int64_t(a.P) * a.D;
    return {static_cast<const T*>(a.prefix_k) + off, static_cast<const T*>(a.prefix_v) + off, a.D, a.D,
            int64_t(kb) * kBlk, a.P, true};
  }
  return {static_cast<const T*>(a.k.ptr) + b * a.k.stride_b + hk * a.k.stride_h,
          static_cast<const T*>(a.v.ptr) + b * a.v.stride_b + hk * a.v.stride_h, a.k.stride_row, a.v.stride_row,
          int64_t(kb - n_prefix_blocks) * kBlk, a.S, false};
}

// Sequence key blocks the query rows q0 .. min(q0 + 63, L - 1) can see.
__device__ __forceinline__ int visible_seq_blocks(const PrefixAttentionArgs& a, int64_t q0) {
  int64_t count = a.S;
  if (a.causal) {
    const int64_t last = (q0 + kBlk - 1 < a.L ? q0 + kBlk - 1 : a.L - 1) + (a.S - a.L);
    count = last + 1 < 0 ? 0 : (last + 1 < a.S ? last + 1 : a.S);
  }
  return static_cast<int>((count + kBlk - 1) / kBlk);
}

__device__ __forceinline__ bool key_visible(const PrefixAttentionArgs& a, bool prefix, int64_t j, int64_t nvalid, int64_t i) {
  return j < nvalid && (prefix || !a.causal || j <= i + (a.S - a.L));
}

struct VecFlags {
  bool q, k, v, prefix;
};

// A key block's K and V tiles into dst and dst + kTile (rows past the source zero-filled).
template <typename T, int D>
__device__ __forceinline__ void load_key_block(T* dst, const KeySource<T>& src, const VecFlags& vec) {
  using C = Cfg<T, D>;
  const RowRange rows{src.key0, src.nvalid};
  load_tile<T, kBlk, D, C::kLd, kThreads>(dst, src.k, src.k_stride, rows, 0, D, src.prefix ? vec.prefix : vec.k);
  load_tile<T, kBlk, D, C::kLd, kThreads>(dst + C::kTile, src.v, src.v_stride, rows, 0, D, src.prefix ? vec.prefix : vec.v);
}

// ------------------------------------------------------------------ forward

template <typename T, int D> constexpr int forward_smem_bytes() {
  using C = Cfg<T, D>;
  return (5 * C::kTile + kWarps * C::kP) * int(sizeof(T)) + kWarps * (C::kScr + 3 * 16) * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_forward_kernel(const PrefixAttentionArgs a, VecFlags vec, T* out, float* lse_out) {
  using C = Cfg<T, D>;
  using M = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = q_s + C::kTile;  // 2 stages x (K, V)
  T* p_s = kv_s + 4 * C::kTile;
  float* scr_all = reinterpret_cast<float*>(p_s + kWarps * C::kP);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wrow = warp * 16;
  float* scr = scr_all + warp * C::kScr;
  float* stat = scr_all + kWarps * C::kScr + warp * 48;  // m[16], l[16], alpha[16]
  T* p_w = p_s + warp * C::kP;

  const int b = blockIdx.z, h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int64_t q0 = int64_t(blockIdx.x) * kBlk;
  const T* q = static_cast<const T*>(a.q.ptr) + b * a.q.stride_b + h * a.q.stride_h;
  const int n_prefix = (a.P + kBlk - 1) / kBlk;
  const int n_blocks = n_prefix + visible_seq_blocks(a, q0);
  const float scale_log2 = a.scale * kLog2e;

  auto load_keys = [&](int kb, int stage) {
    load_key_block<T, D>(kv_s + stage * 2 * C::kTile, key_source<T>(a, b, hk, kb, n_prefix), vec);
  };

  load_tile<T, kBlk, D, C::kLd, kThreads>(q_s, q, a.q.stride_row, RowRange{q0, a.L}, 0, D, vec.q);
  if (n_blocks > 0) load_keys(0, 0);
  cp_async_commit();
  if (lane < 16) {
    stat[lane] = kNegInf;
    stat[16 + lane] = 0.f;
  }
  const RowMap rows = probe_rows<T>(scr, lane);
  typename M::Acc o[C::kDF];
#pragma unroll
  for (int f = 0; f < C::kDF; ++f) wmma::fill_fragment(o[f], 0.f);

  for (int kb = 0; kb < n_blocks; ++kb) {
    if (kb + 1 < n_blocks) load_keys(kb + 1, (kb + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = kv_s + (kb & 1) * 2 * C::kTile;
    const T* v_s = k_s + C::kTile;
    const KeySource<T> src = key_source<T>(a, b, hk, kb, n_prefix);

    // S = Q K^T for this warp's 16 queries x 64 keys
    block_times_tile_t<T, D>(scr, q_s + wrow * C::kLd, k_s);
    __syncwarp();

    // online softmax: lane pair (r, half) owns row r, keys half*32 .. half*32+31
    {
      const int r = lane >> 1, half = lane & 1;
      const int64_t i = q0 + wrow + r;
      float vals[32];
      float mx = kNegInf;
#pragma unroll
      for (int c = 0; c < 32; ++c) {
        const int col = half * 32 + c;
        const bool vis = key_visible(a, src.prefix, src.key0 + col, src.nvalid, i);
        vals[c] = vis ? scr[r * C::kLdS + col] * scale_log2 : kNegInf;
        mx = fmaxf(mx, vals[c]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = stat[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < 32; ++c) {
        const float p = exp2f(vals[c] - m_use);
        p_w[r * C::kLdP + half * 32 + c] = from_float<T>(p);
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float alpha = exp2f(m_old - m_use);
      __syncwarp();
      if (half == 0) {
        stat[r] = m_new;
        stat[16 + r] = stat[16 + r] * alpha + sum;
        stat[32 + r] = alpha;
      }
    }
    __syncwarp();

    // O = alpha * O + P V
#pragma unroll
    for (int f = 0; f < C::kDF; ++f)
#pragma unroll
      for (int e = 0; e < 8; ++e) o[f].x[e] *= stat[32 + rows.r[e]];
    p_times_tile<T, D>(o, p_w, v_s);
    __syncthreads();  // the stage is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // out = O / l, lse = m + log l (natural log); rows that saw nothing: 0 and -inf
#pragma unroll
  for (int f = 0; f < C::kDF; ++f)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float l = stat[16 + rows.r[e]];
      o[f].x[e] = l > 0.f ? o[f].x[e] / l : 0.f;
    }
  const int64_t row_base = (int64_t(b) * a.H + h) * a.L;
  if (lane < 16) {
    const int64_t i = q0 + wrow + lane;
    const float l = stat[16 + lane];
    if (i < a.L) lse_out[row_base + i] = l > 0.f ? (stat[lane] + log2f(l)) * kLn2 : kNegInf;
  }
  write_rows<T, D>(o, 1.f, scr, lane, [&](int r) -> T* {
    const int64_t i = q0 + wrow + r;
    return i < a.L ? out + (row_base + i) * D : nullptr;
  });
}

// ------------------------------------------------------------------ backward: delta

template <typename T>
__global__ void attention_delta_kernel(const T* grad_out, const T* out, float* delta, int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_float(grad_out[row * D + d]) * to_float(out[row * D + d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = s;
  }
}

// Loads lse and delta of query rows q0.. (rows >= L: lse = -inf, nothing visible).
__device__ __forceinline__ void load_row_stats(float* lse_s, float* delta_s, const float* lse, const float* delta,
                                               int64_t row_base, int64_t q0, int L) {
  for (int t = threadIdx.x; t < kBlk; t += kThreads) {
    const bool ok = q0 + t < L;
    lse_s[t] = ok ? lse[row_base + q0 + t] : kNegInf;
    delta_s[t] = ok ? delta[row_base + q0 + t] : 0.f;
  }
}

// p = exp(s * scale - lse) where visible, else 0 (also when the row saw nothing: lse = -inf).
__device__ __forceinline__ float prob(float s, float scale_log2, float lse, bool vis) {
  return (vis && lse != kNegInf) ? exp2f(s * scale_log2 - lse * kLog2e) : 0.f;
}

// ------------------------------------------------------------------ backward: dK, dV

template <typename T, int D> constexpr int dkv_smem_bytes() {
  using C = Cfg<T, D>;
  return (6 * C::kTile + kWarps * C::kP) * int(sizeof(T)) + (kWarps * 2 * C::kScr + 4 * kBlk) * 4;
}

struct DkvArgs {
  const void* grad_out;
  const float* lse;
  const float* delta;
  void* dk;           // [B, Hkv, S, D] (sequence keys)
  void* dv;
  float* ws_prefix_k;  // [B, Hkv, P, D] per-sample partials (prefix keys)
  float* ws_prefix_v;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_dkv_kernel(const PrefixAttentionArgs a, VecFlags vec, const DkvArgs g) {
  using C = Cfg<T, D>;
  using M = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + C::kTile;
  T* qdo_s = v_s + C::kTile;  // 2 stages x (Q, dO)
  T* p_s = qdo_s + 4 * C::kTile;
  float* scr_all = reinterpret_cast<float*>(p_s + kWarps * C::kP);
  float* stats_s = scr_all + kWarps * 2 * C::kScr;  // 2 stages x (lse[64], delta[64])
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wkey = warp * 16;
  float* scr_p = scr_all + warp * 2 * C::kScr;  // S^T, then P^T (float32)
  float* scr_dp = scr_p + C::kScr;              // dP^T
  T* p_w = p_s + warp * C::kP;                  // P^T, then dS^T

  const int b = blockIdx.z, hk = blockIdx.y, kb = blockIdx.x;
  const int G = a.H / a.Hkv;
  const int n_prefix = (a.P + kBlk - 1) / kBlk;
  const KeySource<T> src = key_source<T>(a, b, hk, kb, n_prefix);
  const float scale_log2 = a.scale * kLog2e;
  const T* dout = static_cast<const T*>(g.grad_out);

  load_key_block<T, D>(k_s, src, vec);  // K then V (v_s follows k_s)
  // Queries that can see this block: all for the prefix; i >= key0 - (S - L) for causal sequence keys.
  int qb_start = 0;
  if (!src.prefix && a.causal) {
    const int64_t first = src.key0 - (a.S - a.L);
    qb_start = first <= 0 ? 0 : static_cast<int>(first / kBlk);
  }
  const int n_qb = (a.L + kBlk - 1) / kBlk;
  const int per_head = n_qb > qb_start ? n_qb - qb_start : 0;
  const int n_iter = G * per_head;

  auto load_queries = [&](int it, int stage) {
    const int h = hk * G + it / per_head;
    const int64_t q0 = int64_t(qb_start + it % per_head) * kBlk;
    const T* q = static_cast<const T*>(a.q.ptr) + b * a.q.stride_b + h * a.q.stride_h;
    const int64_t row_base = (int64_t(b) * a.H + h) * a.L;
    T* st = qdo_s + stage * 2 * C::kTile;
    load_tile<T, kBlk, D, C::kLd, kThreads>(st, q, a.q.stride_row, RowRange{q0, a.L}, 0, D, vec.q);
    load_tile<T, kBlk, D, C::kLd, kThreads>(st + C::kTile, dout + row_base * D, D, RowRange{q0, a.L}, 0, D, true);
    load_row_stats(stats_s + stage * 2 * kBlk, stats_s + stage * 2 * kBlk + kBlk, g.lse, g.delta, row_base, q0, a.L);
  };

  if (n_iter > 0) load_queries(0, 0);
  cp_async_commit();
  typename M::Acc dk[C::kDF], dv[C::kDF];
#pragma unroll
  for (int f = 0; f < C::kDF; ++f) {
    wmma::fill_fragment(dk[f], 0.f);
    wmma::fill_fragment(dv[f], 0.f);
  }

  for (int it = 0; it < n_iter; ++it) {
    if (it + 1 < n_iter) load_queries(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int stage = it & 1;
    const T* q_s = qdo_s + stage * 2 * C::kTile;
    const T* do_s = q_s + C::kTile;
    const float* lse_s = stats_s + stage * 2 * kBlk;
    const float* delta_s = lse_s + kBlk;
    const int64_t q0 = int64_t(qb_start + it % per_head) * kBlk;

    // S^T = K Q^T and dP^T = V dO^T (this warp's 16 keys x 64 queries), one after the other
    block_times_tile_t<T, D>(scr_p, k_s + wkey * C::kLd, q_s);
    block_times_tile_t<T, D>(scr_dp, v_s + wkey * C::kLd, do_s);
    __syncwarp();
    {  // P^T and dS^T = P^T * (dP^T - delta): lane pair (r, half) owns key r, queries half*32..
      const int r = lane >> 1, half = lane & 1;
      const int64_t j = src.key0 + wkey + r;
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const int col = half * 32 + c;
        const bool vis = (q0 + col < a.L) && key_visible(a, src.prefix, j, src.nvalid, q0 + col);
        const float p = prob(scr_p[r * C::kLdS + col], scale_log2, lse_s[col], vis);
        scr_p[r * C::kLdS + col] = p * (scr_dp[r * C::kLdS + col] - delta_s[col]);  // dS^T (float32)
        p_w[r * C::kLdP + col] = from_float<T>(p);
      }
    }
    __syncwarp();
    p_times_tile<T, D>(dv, p_w, do_s);  // dV += P^T dO
    __syncwarp();
    for (int idx = lane; idx < 16 * kBlk; idx += 32) {
      const int r = idx / kBlk, c = idx % kBlk;
      p_w[r * C::kLdP + c] = from_float<T>(scr_p[r * C::kLdS + c]);
    }
    __syncwarp();
    p_times_tile<T, D>(dk, p_w, q_s);  // dK += dS^T Q (scaled at the end)
    __syncthreads();
  }
  cp_async_wait<0>();

  // This warp's 16 keys: sequence keys to dk/dv, prefix keys to the sample's float32 partials.
  const int64_t kv_row = int64_t(b) * a.Hkv + hk;
  if (src.prefix) {
    auto partial = [&](float* ws) {
      return [&, ws](int r) -> float* {
        const int64_t j = src.key0 + wkey + r;
        return ws && j < src.nvalid ? ws + (kv_row * a.P + j) * D : nullptr;
      };
    };
    write_rows<T, D>(dk, a.scale, scr_p, lane, partial(g.ws_prefix_k));
    write_rows<T, D>(dv, 1.f, scr_p, lane, partial(g.ws_prefix_v));
  } else {
    auto rows_of = [&](void* dst) {
      return [&, dst](int r) -> T* {
        const int64_t j = src.key0 + wkey + r;
        return dst && j < src.nvalid ? static_cast<T*>(dst) + (kv_row * a.S + j) * D : nullptr;
      };
    };
    write_rows<T, D>(dk, a.scale, scr_p, lane, rows_of(g.dk));
    write_rows<T, D>(dv, 1.f, scr_p, lane, rows_of(g.dv));
  }
}

// ------------------------------------------------------------------ backward: dQ

template <typename T, int D> constexpr int dq_smem_bytes() {
  using C = Cfg<T, D>;
  return (6 * C::kTile + kWarps * C::kP) * int(sizeof(T)) + (kWarps * 2 * C::kScr + 2 * kBlk) * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_dq_kernel(const PrefixAttentionArgs a, VecFlags vec, const void* grad_out, const float* lse,
                               const float* delta, T* dq) {
  using C = Cfg<T, D>;
  using M = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + C::kTile;
  T* kv_s = do_s + C::kTile;  // 2 stages x (K, V)
  T* p_s = kv_s + 4 * C::kTile;
  float* scr_all = reinterpret_cast<float*>(p_s + kWarps * C::kP);
  float* lse_s = scr_all + kWarps * 2 * C::kScr;
  float* delta_s = lse_s + kBlk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wrow = warp * 16;
  float* scr_p = scr_all + warp * 2 * C::kScr;
  float* scr_dp = scr_p + C::kScr;
  T* p_w = p_s + warp * C::kP;

  const int b = blockIdx.z, h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int64_t q0 = int64_t(blockIdx.x) * kBlk;
  const int64_t row_base = (int64_t(b) * a.H + h) * a.L;
  const int n_prefix = (a.P + kBlk - 1) / kBlk;
  const int n_blocks = n_prefix + visible_seq_blocks(a, q0);
  const float scale_log2 = a.scale * kLog2e;

  auto load_keys = [&](int kb, int stage) {
    load_key_block<T, D>(kv_s + stage * 2 * C::kTile, key_source<T>(a, b, hk, kb, n_prefix), vec);
  };
  const T* q = static_cast<const T*>(a.q.ptr) + b * a.q.stride_b + h * a.q.stride_h;
  load_tile<T, kBlk, D, C::kLd, kThreads>(q_s, q, a.q.stride_row, RowRange{q0, a.L}, 0, D, vec.q);
  load_tile<T, kBlk, D, C::kLd, kThreads>(do_s, static_cast<const T*>(grad_out) + row_base * D, D, RowRange{q0, a.L}, 0,
                                          D, true);
  load_row_stats(lse_s, delta_s, lse, delta, row_base, q0, a.L);
  if (n_blocks > 0) load_keys(0, 0);
  cp_async_commit();
  typename M::Acc acc[C::kDF];
#pragma unroll
  for (int f = 0; f < C::kDF; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int kb = 0; kb < n_blocks; ++kb) {
    if (kb + 1 < n_blocks) load_keys(kb + 1, (kb + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = kv_s + (kb & 1) * 2 * C::kTile;
    const T* v_s = k_s + C::kTile;
    const KeySource<T> src = key_source<T>(a, b, hk, kb, n_prefix);

    // S = Q K^T and dP = dO V^T (this warp's 16 queries x 64 keys), one after the other
    block_times_tile_t<T, D>(scr_p, q_s + wrow * C::kLd, k_s);
    block_times_tile_t<T, D>(scr_dp, do_s + wrow * C::kLd, v_s);
    __syncwarp();
    {  // dS = P * (dP - delta): lane pair (r, half) owns query r, keys half*32..
      const int r = lane >> 1, half = lane & 1;
      const int64_t i = q0 + wrow + r;
      const float row_lse = lse_s[wrow + r], row_delta = delta_s[wrow + r];
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const int col = half * 32 + c;
        const bool vis = i < a.L && key_visible(a, src.prefix, src.key0 + col, src.nvalid, i);
        const float p = prob(scr_p[r * C::kLdS + col], scale_log2, row_lse, vis);
        p_w[r * C::kLdP + col] = from_float<T>(p * (scr_dp[r * C::kLdS + col] - row_delta));
      }
    }
    __syncwarp();
    p_times_tile<T, D>(acc, p_w, k_s);  // dQ += dS K (scaled at the end)
    __syncthreads();
  }
  cp_async_wait<0>();

  write_rows<T, D>(acc, a.scale, scr_p, lane, [&](int r) -> T* {
    const int64_t i = q0 + wrow + r;
    return i < a.L ? dq + (row_base + i) * D : nullptr;
  });
}

// ------------------------------------------------------------------ backward: prefix sums

// dprefix[task, hk, p, d] = sum over samples b of task (all b for a shared prefix) of ws[b, hk, p, d].
template <typename T>
__global__ void prefix_grad_reduce_kernel(const float* ws, const int64_t* prefix_ids, T* out, int B, int tasks,
                                          int64_t per_sample) {
  const int64_t total = int64_t(tasks) * per_sample;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t task = idx / per_sample, at = idx % per_sample;
    float s = 0.f;
    for (int b = 0; b < B; ++b)
      if (!prefix_ids || prefix_ids[b] == task) s += ws[int64_t(b) * per_sample + at];
    out[idx] = from_float<T>(s);
  }
}

// ------------------------------------------------------------------ dispatch

template <typename T> struct TypeOnly {
  using type = T;
};
template <typename T, int DD> struct TypeD {
  using type = T;
  static constexpr int d = DD;
};

template <typename F> cudaError_t dispatch(DType dtype, int D, F&& f) {
  auto with_d = [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (D == 64) return f(TypeD<T, 64>{});
    if (D == 128) return f(TypeD<T, 128>{});
    return cudaErrorInvalidValue;
  };
  if (dtype == DType::kFloat16) return with_d(TypeOnly<__half>{});
  if (dtype == DType::kBFloat16) return with_d(TypeOnly<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

VecFlags vec_flags(const PrefixAttentionArgs& a) {
  // 16-byte rows everywhere: strides in whole 8-element vectors and an aligned base (D % 8 == 0)
  auto ok = [](const AttnOperand& o) {
    return o.stride_b % 8 == 0 && o.stride_h % 8 == 0 && o.stride_row % 8 == 0 && is_aligned16(o.ptr);
  };
  return {ok(a.q), ok(a.k), ok(a.v), is_aligned16(a.prefix_k) && is_aligned16(a.prefix_v)};
}

bool valid_args(const PrefixAttentionArgs& a) {
  return a.Hkv > 0 && a.H % a.Hkv == 0 && attention_head_dim_supported(a.D) && a.L >= 0 && a.S >= 0 && a.P >= 0 &&
         a.num_tasks >= 1 && (a.P == 0 || (a.prefix_k && a.prefix_v));
}

size_t round_up(size_t v) { return (v + 255) / 256 * 256; }

struct BwdPlan {
  size_t delta, ws_k, ws_v, total;
};

BwdPlan backward_plan(const PrefixAttentionArgs& a, const PrefixAttentionGrads& g) {
  const size_t partial = round_up(size_t(a.B) * a.Hkv * a.P * a.D * 4);
  BwdPlan p{};
  p.delta = 0;
  p.ws_k = round_up(size_t(a.B) * a.H * a.L * 4);
  p.ws_v = p.ws_k + (g.dprefix_k && a.P > 0 ? partial : 0);
  p.total = p.ws_v + (g.dprefix_v && a.P > 0 ? partial : 0);
  return p;
}

cudaError_t zero(void* p, size_t bytes, cudaStream_t stream) {
  return p && bytes ? cudaMemsetAsync(p, 0, bytes, stream) : cudaSuccess;
}

}  // namespace

cudaError_t prefix_attention_forward(const PrefixAttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.H == 0 || a.L == 0) return cudaSuccess;
  return dispatch(a.dtype, a.D, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(tag)::d;
    auto kernel = prefix_attention_forward_kernel<T, D>;
    constexpr int smem_bytes = forward_smem_bytes<T, D>();
    cudaError_t err = set_smem_limit(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((a.L + kBlk - 1) / kBlk), a.H, a.B);
    kernel<<<grid, kThreads, smem_bytes, stream>>>(a, vec_flags(a), static_cast<T*>(out), lse);
    return cudaGetLastError();
  });
}

size_t prefix_attention_backward_workspace_bytes(const PrefixAttentionArgs& a, const PrefixAttentionGrads& g) {
  return backward_plan(a, g).total;
}

cudaError_t prefix_attention_backward(const PrefixAttentionArgs& a, const PrefixAttentionGrads& g, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  const size_t es = 2;
  const size_t kv_bytes = size_t(a.B) * a.Hkv * a.S * a.D * es;
  const size_t prefix_bytes = size_t(a.num_tasks) * a.Hkv * a.P * a.D * es;
  if (a.B == 0 || a.H == 0 || a.L == 0) {  // no query: every key and prefix gradient is zero
    cudaError_t err;
    if ((err = zero(g.dk, kv_bytes, stream)) != cudaSuccess || (err = zero(g.dv, kv_bytes, stream)) != cudaSuccess ||
        (err = zero(g.dprefix_k, prefix_bytes, stream)) != cudaSuccess)
      return err;
    return zero(g.dprefix_v, prefix_bytes, stream);
  }
  const BwdPlan plan = backward_plan(a, g);
  if (g.workspace_bytes < plan.total || !g.workspace) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(g.workspace);
  float* delta = reinterpret_cast<float*>(ws + plan.delta);
  float* ws_k = g.dprefix_k && a.P > 0 ? reinterpret_cast<float*>(ws + plan.ws_k) : nullptr;
  float* ws_v = g.dprefix_v && a.P > 0 ? reinterpret_cast<float*>(ws + plan.ws_v) : nullptr;

  return dispatch(a.dtype, a.D, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(tag)::d;
    const VecFlags vec = vec_flags(a);
    cudaError_t err;
    const int64_t rows = int64_t(a.B) * a.H * a.L;
    const int64_t delta_blocks = std::min<int64_t>((rows * 32 + 255) / 256, 8192);
    attention_delta_kernel<T><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(
        static_cast<const T*>(g.grad_out), static_cast<const T*>(g.out), delta, rows, D);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    const int key_blocks = (a.P + kBlk - 1) / kBlk + (a.S + kBlk - 1) / kBlk;
    if ((g.dk || g.dv || ws_k || ws_v) && key_blocks > 0) {
      auto kernel = prefix_attention_dkv_kernel<T, D>;
      constexpr int smem_bytes = dkv_smem_bytes<T, D>();
      if ((err = set_smem_limit(kernel, smem_bytes)) != cudaSuccess) return err;
      const DkvArgs dargs{g.grad_out, g.lse, delta, g.dk, g.dv, ws_k, ws_v};
      kernel<<<dim3(key_blocks, a.Hkv, a.B), kThreads, smem_bytes, stream>>>(a, vec, dargs);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (g.dq) {
      auto kernel = prefix_attention_dq_kernel<T, D>;
      constexpr int smem_bytes = dq_smem_bytes<T, D>();
      if ((err = set_smem_limit(kernel, smem_bytes)) != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>((a.L + kBlk - 1) / kBlk), a.H, a.B);
      kernel<<<grid, kThreads, smem_bytes, stream>>>(a, vec, g.grad_out, g.lse, delta, static_cast<T*>(g.dq));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    const int64_t per_sample = int64_t(a.Hkv) * a.P * a.D;
    const int64_t total = int64_t(a.num_tasks) * per_sample;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 8192);
    for (int which = 0; which < 2 && total > 0; ++which) {
      float* part = which == 0 ? ws_k : ws_v;
      void* dst = which == 0 ? g.dprefix_k : g.dprefix_v;
      if (!part || !dst) continue;
      prefix_grad_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          part, a.prefix_ids, static_cast<T*>(dst), a.B, a.num_tasks, per_sample);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace peftkern::kernels
