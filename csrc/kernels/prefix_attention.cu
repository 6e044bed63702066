// Prefix attention: the prefix part and the merge with the sequence part (see prefix_attention.h).
//
// A block is 4 warps and owns 64 query rows of one (sample, kv head); each warp owns 16 rows. The
// prefix is visited in tiles of kPT keys kept in shared memory (forward: K row-major and V
// transposed; backward: K and V row-major and K transposed), so per query row the only global
// traffic is q (plus grad_out and out in the backward), read once per prefix tile through L1, and
// the row's writes. Statistics in float32, in log2 units inside the kernels.
//
// Products: mma.sync.aligned.m16n8k16.row.col, float32 accumulators, with the fragment layouts of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"). For lane = 4 g + t:
//   A (16 x 16, row major): reg0 (row g, cols 2t, 2t+1)    reg1 (row g+8, cols 2t, 2t+1)
//                           reg2 (row g, cols 2t+8, 2t+9)  reg3 (row g+8, cols 2t+8, 2t+9)
//   B (16 x 8, k x n):      reg0 (k 2t, 2t+1; n g)         reg1 (k 2t+8, 2t+9; n g)
//   C (16 x 8, float32):    c0, c1 (row g, cols 2t, 2t+1)  c2, c3 (row g+8, cols 2t, 2t+1)
// with the lower-indexed element of a pair in the low 16 bits. The C tiles of keys 16kk..16kk+7
// and 16kk+8..16kk+15 are then, element for element, the A fragment over those 16 keys, so the
// probabilities (and dS) go from one product into the next without leaving registers
// (FlashAttention-2's trick). B fragments are read from shared memory as 32-bit words: two
// consecutive k of one n must be adjacent, hence the [key][d] tiles for q k^T and dO v^T and the
// transposed [d][key] tiles for p v and dS k.
#include <cfloat>
#include <climits>
#include <cstring>

#include "common.cuh"
#include "dispatch.cuh"
#include "prefix_attention.h"

namespace peftkern::kernels {
namespace {

using namespace peftkern::cuda;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16 * kWarps;
static_assert(kRowsPerBlock == kPrefixAttentionRowsPerBlock, "prefix_attention.h promises 64-row blocks");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// Prefix keys per tile and shared-memory row strides. The +8 padding keeps rows 16-byte aligned and
// makes the 32-bit fragment reads (8 rows g x 4 words t) hit 32 distinct banks: row strides of
// (kMaxD + 8) / 2 and (kPT + 8) / 2 words are 4 mod 32, or 20 / 12 words, for every size here.
template <int kMaxD, bool kBackward> struct Tiles {
  static constexpr int kPT = kBackward ? (kMaxD == 256 ? 16 : 32) : (kMaxD == 256 ? 32 : 64);
  static constexpr int kLdRow = kMaxD + 8;  // [key][d] tiles
  static constexpr int kLdCol = kPT + 8;    // [d][key] tiles
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 v;
  memcpy(&v, &u, 4);
  return __half22float2(v);
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  __nv_bfloat162 v;
  memcpy(&v, &u, 4);
  return __bfloat1622float2(v);
}

// c += a (16 x 16) b (16 x 8). sm_80+ (the host never launches these kernels below sm_80).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *static_cast<const uint32_t*>(p); }

// Elements col, col + 1 of a row (null row, or col past D: zeros).
template <typename T> __device__ __forceinline__ uint32_t ld_pair(const T* row, int col, int D) {
  return (row != nullptr && col < D) ? *reinterpret_cast<const uint32_t*>(row + col) : 0u;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One query row of a block: row r = g * L + i of (sample b, kv head hk) is head hk * G + g, query i.
struct Row {
  bool valid;
  int h;
  int64_t i;
};

struct BlockPos {
  int b, hk;
  int64_t row0;        // first row of the block
  int P;               // prefix keys this block's sample sees (0 for an out-of-range task id)
  int64_t prefix_off;  // of its [P, D] prefix matrices in prefix_k / prefix_v
};

__device__ __forceinline__ BlockPos block_pos(const PrefixAttentionShape& s, int64_t row_tiles) {
  BlockPos p;
  int64_t blk = blockIdx.x;
  const int64_t tile = blk % row_tiles;
  blk /= row_tiles;
  p.hk = static_cast<int>(blk % s.Hkv);
  p.b = static_cast<int>(blk / s.Hkv);
  p.row0 = tile * kRowsPerBlock;
  const int64_t task = s.prefix_ids ? s.prefix_ids[p.b] : 0;
  p.P = (task >= 0 && task < s.num_tasks) ? s.P : 0;
  p.prefix_off = p.P > 0 ? (task * s.Hkv + p.hk) * static_cast<int64_t>(s.P) * s.D : 0;
  return p;
}

__device__ __forceinline__ Row row_at(const PrefixAttentionShape& s, const BlockPos& p, int64_t r) {
  const int G = s.H / s.Hkv;
  Row row;
  row.valid = r < static_cast<int64_t>(G) * s.L;
  row.h = row.valid ? p.hk * G + static_cast<int>(r / s.L) : 0;
  row.i = row.valid ? r % s.L : 0;
  return row;
}

template <typename T> __device__ __forceinline__ T* row_ptr(const AttnRows& v, int b, const Row& r) {
  return r.valid ? static_cast<T*>(v.ptr) + b * v.sb + r.h * v.sh + r.i * v.sr : nullptr;
}
__device__ __forceinline__ float* stat_ptr(const AttnStats& v, int b, const Row& r) {
  return r.valid ? v.ptr + b * v.sb + r.h * v.sh + r.i * v.sr : nullptr;
}
// The row's gate (1 without one, or past the end).
template <typename T> __device__ __forceinline__ float gate_at(const AttnGate& v, int b, const Row& r) {
  return (v.ptr != nullptr && r.valid) ? to_float(static_cast<const T*>(v.ptr)[b * v.sb + r.h * v.sh + r.i * v.sr])
                                       : 1.f;
}
// The row's prefix bias (null without one, or past the end): its key p at [p * sp].
template <typename T> __device__ __forceinline__ const T* bias_row(const AttnBias& v, int b, const Row& r) {
  return (v.ptr != nullptr && r.valid) ? static_cast<const T*>(v.ptr) + b * v.sb + r.h * v.sh + r.i * v.sr : nullptr;
}
// Bias element of key p for a row (0 for a null row; the caller reads only keys below P).
template <typename T> __device__ __forceinline__ float bias_at(const T* row, int64_t sp, int p) {
  return row != nullptr ? to_float(row[p * sp]) : 0.f;
}

// Rows [p0, p0 + kPT) of a [P, D] prefix matrix into a [kPT][kLdRow] tile (zeros past P and D).
template <typename T, int kMaxD, int kPT, int kLd>
__device__ __forceinline__ void load_rows(T* tile, const T* src, int p0, int P, int D) {
  constexpr int kChunks = kMaxD / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kPT * kChunks; idx += kThreads) {
    const int j = idx / kChunks, c = (idx % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (p0 + j < P && c < D) val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(p0 + j) * D + c);
    *reinterpret_cast<uint4*>(tile + j * kLd + c) = val;
  }
}

// The same rows transposed into a [kMaxD][kLdCol] tile. Consecutive threads take consecutive keys,
// so a warp's 2-byte stores cover 64 consecutive bytes of one tile row (no bank conflicts).
template <typename T, int kMaxD, int kPT, int kLd>
__device__ __forceinline__ void load_cols(T* tile, const T* src, int p0, int P, int D) {
  constexpr int kChunks = kMaxD / 8;
  for (int idx = threadIdx.x; idx < kPT * kChunks; idx += kThreads) {
    const int j = idx % kPT, c = (idx / kPT) * 8;
    union {
      uint4 u;
      T e[8];
    } val;
    val.u = make_uint4(0u, 0u, 0u, 0u);
    if (p0 + j < P && c < D) val.u = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(p0 + j) * D + c);
#pragma unroll
    for (int e = 0; e < 8; ++e) tile[(c + e) * kLd + j] = val.e[e];
  }
}

// acc[nt] += rows(16 x D, A fragments read from global rows ra / rb) @ tile^T, tile = [kPT][kLdRow]
// (keys x d): scores of a warp's 16 rows against the tile's kPT keys.
template <typename T, int kMaxD, int kPT, int kLd>
__device__ __forceinline__ void rows_times_tile_t(float (&acc)[kPT / 8][4], const T* ra, const T* rb, const T* tile,
                                                  int D, int g, int t) {
#pragma unroll
  for (int kd = 0; kd < kMaxD / 16; ++kd) {
    if (kd * 16 >= D) break;
    const int c = kd * 16 + 2 * t;
    const uint32_t a[4] = {ld_pair(ra, c, D), ld_pair(rb, c, D), ld_pair(ra, c + 8, D), ld_pair(rb, c + 8, D)};
#pragma unroll
    for (int nt = 0; nt < kPT / 8; ++nt) {
      const T* k = tile + (nt * 8 + g) * kLd + kd * 16 + 2 * t;
      mma_16816<T>(acc[nt], a, lds32(k), lds32(k + 8));
    }
  }
}

// acc[nd] += x(16 x kPT, C fragments in registers) @ tile, tile = [kMaxD][kLdCol] (d x keys).
template <typename T, int kMaxD, int kPT, int kLd>
__device__ __forceinline__ void regs_times_tile(float (&acc)[kMaxD / 8][4], const float (&x)[kPT / 8][4], const T* tile,
                                                int D, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < kPT / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                           pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]), pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int nd = 0; nd < kMaxD / 8; ++nd) {
      if (nd * 8 >= D) break;
      const T* v = tile + (nd * 8 + g) * kLd + kk * 16 + 2 * t;
      mma_16816<T>(acc[nd], a, lds32(v), lds32(v + 8));
    }
  }
}

// ------------------------------------------------------------------ forward

// kBiased: the prefix scores get s.bias (a separate instance, so the unbiased one keeps its registers).
template <typename T, int kMaxD, bool kBiased>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_forward_kernel(PrefixAttentionShape s, PrefixAttentionForward a, int64_t row_tiles) {
  using Cfg = Tiles<kMaxD, false>;
  constexpr int kPT = Cfg::kPT;
  __shared__ __align__(16) T k_tile[kPT * Cfg::kLdRow];
  __shared__ __align__(16) T vt_tile[kMaxD * Cfg::kLdCol];
  static_assert(sizeof(k_tile) + sizeof(vt_tile) <= 48 * 1024, "static shared memory above 48 KB");

  const BlockPos pos = block_pos(s, row_tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const Row row_a = row_at(s, pos, pos.row0 + warp * 16 + g), row_b = row_at(s, pos, pos.row0 + warp * 16 + g + 8);
  const T* qa = row_ptr<T>(a.q, pos.b, row_a);
  const T* qb = row_ptr<T>(a.q, pos.b, row_b);
  const T* pk = static_cast<const T*>(s.prefix_k) + pos.prefix_off;
  const T* pv = static_cast<const T*>(s.prefix_v) + pos.prefix_off;
  const float scale_log2 = s.scale * kLog2e;
  const T* bias_a = kBiased ? bias_row<T>(s.bias, pos.b, row_a) : nullptr;
  const T* bias_b = kBiased ? bias_row<T>(s.bias, pos.b, row_b) : nullptr;

  float o[kMaxD / 8][4] = {};                            // unnormalised prefix output
  float m_a = -kInf, m_b = -kInf, l_a = 0.f, l_b = 0.f;  // running max (log2 units), this lane's partial sums
  for (int p0 = 0; p0 < pos.P; p0 += kPT) {
    __syncthreads();  // the previous tile is consumed
    load_rows<T, kMaxD, kPT, Cfg::kLdRow>(k_tile, pk, p0, pos.P, s.D);
    load_cols<T, kMaxD, kPT, Cfg::kLdCol>(vt_tile, pv, p0, pos.P, s.D);
    __syncthreads();

    float sc[kPT / 8][4] = {};
    rows_times_tile_t<T, kMaxD, kPT, Cfg::kLdRow>(sc, qa, qb, k_tile, s.D, g, t);
    float mx_a = -kInf, mx_b = -kInf;
#pragma unroll
    for (int nt = 0; nt < kPT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = p0 + nt * 8 + 2 * t + (e & 1);
        const bool key_ok = key < pos.P;
        float bias = 0.f;
        if constexpr (kBiased) bias = key_ok ? bias_at(e < 2 ? bias_a : bias_b, s.bias.sp, key) * kLog2e : 0.f;
        sc[nt][e] = key_ok ? sc[nt][e] * scale_log2 + bias : -kInf;
      }
      mx_a = fmaxf(mx_a, fmaxf(sc[nt][0], sc[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(sc[nt][2], sc[nt][3]));
    }
    // Every tile holds a key below P, so the maxima are finite for finite inputs; a row whose scores
    // are all -inf (infinite inputs) subtracts 0 instead (-inf - -inf would be NaN).
    const float new_a = fmaxf(m_a, quad_max(mx_a)), new_b = fmaxf(m_b, quad_max(mx_b));
    const float use_a = new_a == -kInf ? 0.f : new_a, use_b = new_b == -kInf ? 0.f : new_b;
    const float alpha_a = exp2f(m_a - use_a), alpha_b = exp2f(m_b - use_b);  // 0 on the first tile
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int nd = 0; nd < kMaxD / 8; ++nd) {
      o[nd][0] *= alpha_a;
      o[nd][1] *= alpha_a;
      o[nd][2] *= alpha_b;
      o[nd][3] *= alpha_b;
    }
#pragma unroll
    for (int nt = 0; nt < kPT / 8; ++nt) {
      sc[nt][0] = exp2f(sc[nt][0] - use_a);
      sc[nt][1] = exp2f(sc[nt][1] - use_a);
      sc[nt][2] = exp2f(sc[nt][2] - use_b);
      sc[nt][3] = exp2f(sc[nt][3] - use_b);
      l_a += sc[nt][0] + sc[nt][1];
      l_b += sc[nt][2] + sc[nt][3];
    }
    regs_times_tile<T, kMaxD, kPT, Cfg::kLdCol>(o, sc, vt_tile, s.D, g, t);
  }
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);

  // Merge each row with the sequence part and write out, lse.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const Row& row = half == 0 ? row_a : row_b;
    if (!row.valid) continue;
    const float m = half == 0 ? m_a : m_b, l = half == 0 ? l_a : l_b;
    // log2 units; l = 0: every prefix key hidden; a NaN l (NaN or +inf scores) stays NaN
    const float lse_p = pos.P > 0 && !(l == 0.f) ? m + log2f(l) : -kInf;
    float lse_s = -kInf;
    const T* seq_row = nullptr;
    if (a.seq_out.ptr != nullptr) {
      const float v = *stat_ptr(a.seq_lse, pos.b, row);
      if (!(v == -kInf)) {  // -inf: no visible sequence key; +inf (a +inf score) and NaN make out NaN
        lse_s = v * kLog2e;
        seq_row = row_ptr<T>(a.seq_out, pos.b, row);
      }
    }
    // fmaxf drops a NaN operand: keep it, so NaN inputs give NaN out and lse
    const float mx = isnan(lse_s) || isnan(lse_p) ? __int_as_float(0x7fc00000) : fmaxf(lse_s, lse_p);
    float c_seq = 0.f, c_pre = 0.f, lse = kInf;  // a row that sees nothing: out 0, lse +inf
    if (!(mx == -kInf)) {
      const float w_seq = seq_row != nullptr ? exp2f(lse_s - mx) : 0.f;
      const float w_pre = lse_p > -kInf || isnan(lse_p) ? exp2f(lse_p - mx) : 0.f;
      const float total = w_seq + w_pre;
      c_seq = w_seq / total;
      c_pre = w_pre > 0.f || isnan(w_pre) ? w_pre / (total * l) : 0.f;
      c_pre *= gate_at<T>(s.gate, pos.b, row);
      lse = (mx + log2f(total)) * kLn2;
    }
    T* out_row = row_ptr<T>(a.out, pos.b, row);
#pragma unroll
    for (int nd = 0; nd < kMaxD / 8; ++nd) {
      const int c = nd * 8 + 2 * t;
      if (c >= s.D) break;
      float2 v = make_float2(c_pre * o[nd][2 * half], c_pre * o[nd][2 * half + 1]);
      if (seq_row != nullptr) {
        const float2 x = unpack2<T>(*reinterpret_cast<const uint32_t*>(seq_row + c));
        v.x += c_seq * x.x;
        v.y += c_seq * x.y;
      }
      *reinterpret_cast<uint32_t*>(out_row + c) = pack2<T>(v.x, v.y);
    }
    if (t == 0) *stat_ptr(a.lse, pos.b, row) = lse;
  }
}

// ------------------------------------------------------------------ backward

// Minimum CTAs per SM for the backward's __launch_bounds__: 3 (D <= 128, <= 168 registers) or 2
// (D = 256 needs ~220). Told nothing, ptxas spilled D = 64 to fit 4 CTAs' 128 registers.
// The gated instance (kGated: a prefix gate, UniPELT) holds the gates and dgate partials besides:
// D = 128 at 2 CTAs (at 3 it spilled); D = 256 stays at 2 (~232 registers). The biased instances
// (kBiased: an additive prefix bias, T5) hold two bias row pointers and the key stride besides:
// D = 128 at 2 CTAs as well (at 3 it spilled ~30-40 B); gated and biased D = 256 ~244 of 255.
template <int kMaxD, bool kGated, bool kBiased>
constexpr int kBackwardMinBlocks = (kMaxD == 256 || (kMaxD == 128 && (kGated || kBiased))) ? 2 : 3;

template <typename T, int kMaxD, bool kGated, bool kBiased>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<kMaxD, kGated, kBiased>)
    prefix_attention_backward_kernel(PrefixAttentionShape s, PrefixAttentionBackward a, int64_t row_tiles) {
  using Cfg = Tiles<kMaxD, true>;
  constexpr int kPT = Cfg::kPT;
  __shared__ __align__(16) T k_tile[kPT * Cfg::kLdRow];
  __shared__ __align__(16) T v_tile[kPT * Cfg::kLdRow];
  __shared__ __align__(16) T kt_tile[kMaxD * Cfg::kLdCol];
  static_assert(sizeof(k_tile) + sizeof(v_tile) + sizeof(kt_tile) <= 48 * 1024, "static shared memory above 48 KB");

  const BlockPos pos = block_pos(s, row_tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const Row row_a = row_at(s, pos, pos.row0 + warp * 16 + g), row_b = row_at(s, pos, pos.row0 + warp * 16 + g + 8);
  const T* qa = row_ptr<T>(a.q, pos.b, row_a);
  const T* qb = row_ptr<T>(a.q, pos.b, row_b);
  const T* ga = row_ptr<T>(a.grad_out, pos.b, row_a);
  const T* gb = row_ptr<T>(a.grad_out, pos.b, row_b);
  const T* pk = static_cast<const T*>(s.prefix_k) + pos.prefix_off;
  const T* pv = static_cast<const T*>(s.prefix_v) + pos.prefix_off;
  const float scale_log2 = s.scale * kLog2e;

  // delta = rowsum(grad_out * out) and lse (log2 units; +inf for a row past the end: p = 0).
  float delta_a = 0.f, delta_b = 0.f;
  {
    const T* oa = row_ptr<T>(a.out, pos.b, row_a);
    const T* ob = row_ptr<T>(a.out, pos.b, row_b);
    for (int c = 2 * t; c < s.D; c += 8) {
      const float2 xa = unpack2<T>(ld_pair(ga, c, s.D)), ya = unpack2<T>(ld_pair(oa, c, s.D));
      const float2 xb = unpack2<T>(ld_pair(gb, c, s.D)), yb = unpack2<T>(ld_pair(ob, c, s.D));
      delta_a += xa.x * ya.x + xa.y * ya.y;
      delta_b += xb.x * yb.x + xb.y * yb.y;
    }
  }
  delta_a = quad_sum(delta_a);
  delta_b = quad_sum(delta_b);
  const float lse_a = row_a.valid ? *stat_ptr(a.lse, pos.b, row_a) * kLog2e : kInf;
  const float lse_b = row_b.valid ? *stat_ptr(a.lse, pos.b, row_b) * kLog2e : kInf;
  const float gate_a = kGated ? gate_at<T>(s.gate, pos.b, row_a) : 1.f;
  const float gate_b = kGated ? gate_at<T>(s.gate, pos.b, row_b) : 1.f;
  const T* bias_a = kBiased ? bias_row<T>(s.bias, pos.b, row_a) : nullptr;
  const T* bias_b = kBiased ? bias_row<T>(s.bias, pos.b, row_b) : nullptr;
  float dgate_a = 0.f, dgate_b = 0.f;  // this lane's columns of rowsum(p * dO pv^T)
  // Workspace [B, H, L, probs_ld] rows of probs and dscores: one offset per row (-1: none) for both,
  // the pointers formed where written (four row pointers held through the loop spilled on sm_80).
  auto ws_off = [&](const Row& row) -> int64_t {
    return row.valid ? ((static_cast<int64_t>(pos.b) * s.H + row.h) * s.L + row.i) * a.probs_ld : -1;
  };
  const int64_t ws_a = ws_off(row_a), ws_b = ws_off(row_b);
  auto ws_store = [&](void* base, int64_t off, int64_t c, uint32_t v) {
    if (base != nullptr && off >= 0) *reinterpret_cast<uint32_t*>(static_cast<T*>(base) + off + c) = v;
  };

  float dq[kMaxD / 8][4] = {};
  for (int p0 = 0; p0 < pos.P; p0 += kPT) {
    __syncthreads();
    load_rows<T, kMaxD, kPT, Cfg::kLdRow>(k_tile, pk, p0, pos.P, s.D);
    load_rows<T, kMaxD, kPT, Cfg::kLdRow>(v_tile, pv, p0, pos.P, s.D);
    load_cols<T, kMaxD, kPT, Cfg::kLdCol>(kt_tile, pk, p0, pos.P, s.D);
    __syncthreads();

    float p[kPT / 8][4] = {}, ds[kPT / 8][4] = {};
    rows_times_tile_t<T, kMaxD, kPT, Cfg::kLdRow>(p, qa, qb, k_tile, s.D, g, t);   // scores
    rows_times_tile_t<T, kMaxD, kPT, Cfg::kLdRow>(ds, ga, gb, v_tile, s.D, g, t);  // dO v^T
#pragma unroll
    for (int nt = 0; nt < kPT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = p0 + nt * 8 + 2 * t + (e & 1);
        const bool key_ok = key < pos.P;
        float bias = 0.f;
        if constexpr (kBiased) bias = key_ok ? bias_at(e < 2 ? bias_a : bias_b, s.bias.sp, key) * kLog2e : 0.f;
        const float prob = key_ok ? exp2f(p[nt][e] * scale_log2 + bias - (e < 2 ? lse_a : lse_b)) : 0.f;
        const float gate = e < 2 ? gate_a : gate_b;
        if constexpr (kGated) {
          if (e < 2)
            dgate_a += prob * ds[nt][e];
          else
            dgate_b += prob * ds[nt][e];
        }
        p[nt][e] = gate * prob;  // the gated values' probabilities, for dprefix_v
        ds[nt][e] = prob * (gate * ds[nt][e] - (e < 2 ? delta_a : delta_b));
      }
    }
#pragma unroll
    for (int nt = 0; nt < kPT / 8; ++nt) {
      const int64_t c = p0 + nt * 8 + 2 * t;
      if (c >= a.probs_ld) break;
      ws_store(a.probs, ws_a, c, pack2<T>(p[nt][0], p[nt][1]));
      ws_store(a.probs, ws_b, c, pack2<T>(p[nt][2], p[nt][3]));
      ws_store(a.dscores, ws_a, c, pack2<T>(s.scale * ds[nt][0], s.scale * ds[nt][1]));
      ws_store(a.dscores, ws_b, c, pack2<T>(s.scale * ds[nt][2], s.scale * ds[nt][3]));
    }
    if (a.dq.ptr != nullptr) regs_times_tile<T, kMaxD, kPT, Cfg::kLdCol>(dq, ds, kt_tile, s.D, g, t);
  }
  if (kGated && a.dgate != nullptr) {  // every lane shuffles; lane t = 0 of each quad writes its two rows
    dgate_a = quad_sum(dgate_a);
    dgate_b = quad_sum(dgate_b);
    auto at = [&](const Row& row) { return (static_cast<int64_t>(pos.b) * s.H + row.h) * s.L + row.i; };
    if (t == 0 && row_a.valid) a.dgate[at(row_a)] = dgate_a;
    if (t == 0 && row_b.valid) a.dgate[at(row_b)] = dgate_b;
  }
  // Workspace columns past the tiles (all of them for a sample whose task id is out of range): zeros.
  for (int64_t c = round_up<int64_t>(pos.P, kPT) + 2 * t; c < a.probs_ld; c += 8) {
    ws_store(a.probs, ws_a, c, 0u);
    ws_store(a.probs, ws_b, c, 0u);
    ws_store(a.dscores, ws_a, c, 0u);
    ws_store(a.dscores, ws_b, c, 0u);
  }
  if (a.dq.ptr == nullptr) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    T* dq_row = row_ptr<T>(a.dq, pos.b, half == 0 ? row_a : row_b);
    if (dq_row == nullptr) continue;
#pragma unroll
    for (int nd = 0; nd < kMaxD / 8; ++nd) {
      const int c = nd * 8 + 2 * t;
      if (c >= s.D) break;
      float2 v = make_float2(s.scale * dq[nd][2 * half], s.scale * dq[nd][2 * half + 1]);
      if (a.dq_accumulate) {
        const float2 old = unpack2<T>(*reinterpret_cast<const uint32_t*>(dq_row + c));
        v.x += old.x;
        v.y += old.y;
      }
      *reinterpret_cast<uint32_t*>(dq_row + c) = pack2<T>(v.x, v.y);
    }
  }
}

// ------------------------------------------------------------------ launchers

// Blocks: one per 64 rows of each (sample, kv head); 0 when there is nothing to do, -1 past the grid.
int64_t grid_blocks(const PrefixAttentionShape& s, int64_t* row_tiles) {
  const int64_t rows = static_cast<int64_t>(s.H / s.Hkv) * s.L;
  *row_tiles = ceil_div<int64_t>(rows, kRowsPerBlock);
  const int64_t blocks = static_cast<int64_t>(s.B) * s.Hkv * *row_tiles;
  return blocks > INT_MAX ? -1 : blocks;
}

// Checks the shape, then calls launch(TypeTag<T>{}, IntTag<kMaxD>{}, blocks, row_tiles) for the
// kernel instance of its dtype and head-dim tile kMaxD (64, 128 or 256).
template <typename Launch> cudaError_t dispatch(const PrefixAttentionShape& s, Launch launch) {
  if (!prefix_attention_supported(s.dtype, s.D) || s.Hkv < 1 || s.H % s.Hkv != 0) return cudaErrorInvalidValue;
  int64_t row_tiles = 0;
  const int64_t blocks = grid_blocks(s, &row_tiles);
  if (blocks < 0) return cudaErrorInvalidConfiguration;
  if (blocks == 0) return cudaSuccess;
  return dispatch_dtype(s.dtype, [&](auto dtype) {
    return dispatch_bucket<64, 128, 256>(s.D, [&](auto max_d) -> cudaError_t {
      if constexpr (std::is_same_v<typename decltype(dtype)::type, float>) {
        return cudaErrorInvalidValue;  // no float32 instance (prefix_attention_supported says so)
      } else {
        launch(dtype, max_d, static_cast<unsigned>(blocks), row_tiles);
        return cudaGetLastError();
      }
    });
  });
}

}  // namespace

bool prefix_attention_supported(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && head_dim >= 8 && head_dim <= 256 &&
         head_dim % 8 == 0;
}

cudaError_t prefix_attention_forward(const PrefixAttentionShape& s, const PrefixAttentionForward& a,
                                     cudaStream_t stream) {
  return dispatch(s, [&](auto dtype, auto max_d, unsigned blocks, int64_t row_tiles) {
    using T = typename decltype(dtype)::type;
    constexpr int kMaxD = decltype(max_d)::value;
    if (s.bias.ptr != nullptr)
      prefix_attention_forward_kernel<T, kMaxD, true><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
    else
      prefix_attention_forward_kernel<T, kMaxD, false><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
  });
}

cudaError_t prefix_attention_backward(const PrefixAttentionShape& s, const PrefixAttentionBackward& a,
                                      cudaStream_t stream) {
  if ((a.probs != nullptr || a.dscores != nullptr) && (a.probs_ld < s.P || a.probs_ld % 2 != 0))
    return cudaErrorInvalidValue;
  return dispatch(s, [&](auto dtype, auto max_d, unsigned blocks, int64_t row_tiles) {
    using T = typename decltype(dtype)::type;
    constexpr int kMaxD = decltype(max_d)::value;
    const bool gated = s.gate.ptr != nullptr || a.dgate != nullptr, biased = s.bias.ptr != nullptr;
    if (gated && biased)
      prefix_attention_backward_kernel<T, kMaxD, true, true><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
    else if (gated)
      prefix_attention_backward_kernel<T, kMaxD, true, false><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
    else if (biased)
      prefix_attention_backward_kernel<T, kMaxD, false, true><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
    else
      prefix_attention_backward_kernel<T, kMaxD, false, false><<<blocks, kThreads, 0, stream>>>(s, a, row_tiles);
  });
}

}  // namespace peftkern::kernels
