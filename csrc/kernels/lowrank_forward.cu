// Fused low-rank update forward (adapter, LoRA): one kernel, one 64-row block per CTA.
//   phase 1  z = drop(x_blk) @ w_down^T + b_down   (x streamed through a 3-stage cp.async pipeline,
//            dropout applied on chip); h = act(z) kept in shared memory, z stored when saved
//   phase 2  for each 64-wide (32 for fp32 at r > 128) column chunk of y:
//            y = res + scale * g * (h @ w_up_chunk^T + b_up), w_up and res chunks prefetched
// res may be y itself (LoRA adds into the base product): each element is read before it is
// written, by the same block. A block's 64 rows are a list in shared memory: consecutive rows, or
// in a multi-adapter batch one adapter's rows gathered (AdapterSegments), or rows of no adapter,
// which the block copies from res to y.
#include "lowrank.h"
#include "lowrank_tiles.cuh"

namespace peftkern::kernels {
namespace {

using namespace peftkern::cuda;

template <typename T, int RP> struct FwdCfg {
  using Stream = StreamCfg<T, RP>;
  static constexpr int kBN = (sizeof(T) == 4 && RP == 256) ? 32 : 64;
  static constexpr int kLdH = RP + kSmemPad<T>;  // h tile and w_up chunk rows
  static constexpr int kLdRes = kBN + kSmemPad<T>;
  static constexpr int kLdScr = kBN + 4;  // float32 scratch rows
  static constexpr int kUpStageElems = kBN * kLdH + kRowBlock * kLdRes;
  static constexpr int kHBytes = round_up(kRowBlock * kLdH * int(sizeof(T)), 128);
  static constexpr int kUpBytes = 2 * round_up(kUpStageElems * int(sizeof(T)), 128);
  // Phase 1's stages and phase 2's chunks share one region.
  static constexpr int kUnionBytes = Stream::kBytes > kUpBytes ? Stream::kBytes : kUpBytes;
  static constexpr int kUpStageStride = kUpBytes / 2 / int(sizeof(T));
  static constexpr int kScrBytes = kRowWarps * 16 * kLdScr * 4;
  static constexpr int kSmemBytes = kHBytes + kUnionBytes + kScrBytes;
  static_assert(kSmemBytes <= 227 * 1024, "low-rank forward: shared memory over the sm_90 limit (smaller devices: lowrank_fused)");
  static_assert(kLdScr >= 16, "scratch holds a 16x16 fragment");
};

struct FwdVec {  // which operands allow 16-byte accesses
  bool x, res, y, w_down, w_up;
};

// y[rows(i)] = src[rows(i)] for the block's 64 rows (rows mapped to -1 skipped), 8 elements per
// step, copied bit for bit (16-byte words when vec).
template <typename T, typename RowMap>
__device__ __forceinline__ void copy_rows(const T* src, T* y, int n_out, RowMap rows, bool vec) {
  constexpr int kWords = 8 * int(sizeof(T)) / 16;  // 16-byte words in 8 elements
  const int64_t per_row = (int64_t(n_out) + 7) / 8;
  for (int64_t i = threadIdx.x; i < kRowBlock * per_row; i += kRowThreads) {
    const int64_t row = rows(static_cast<int>(i / per_row));
    const int64_t c = (i % per_row) * 8;
    if (row < 0) continue;
    const int valid = n_out - c < 8 ? static_cast<int>(n_out - c) : 8;
    const T* s = src + row * n_out + c;
    T* d = y + row * n_out + c;
    if (vec && valid == 8) {
#pragma unroll
      for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(d)[w] = reinterpret_cast<const uint4*>(s)[w];
    } else {
      for (int e = 0; e < valid; ++e) d[e] = s[e];
    }
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kRowThreads) lowrank_forward_kernel(const LowRankForwardArgs a, const FwdVec vec) {
  using C = FwdCfg<T, RP>;
  using M = Mma<T>;
  PEFTKERN_DYNAMIC_SMEM(C::kSmemBytes);
  extern __shared__ __align__(128) unsigned char smem[];
  T* h_s = reinterpret_cast<T*>(smem);
  T* shared_region = reinterpret_cast<T*>(smem + C::kHBytes);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* scr = reinterpret_cast<float*>(smem + C::kHBytes + C::kUnionBytes) + warp * 16 * C::kLdScr;

  const int n_in = a.n_in, n_out = a.n_out, r = a.r;
  const int wrow = warp * 16;
  const T* w_down = static_cast<const T*>(a.w_down);
  const T* b_down = static_cast<const T*>(a.b_down);
  const T* w_up = static_cast<const T*>(a.w_up);
  const T* b_up = static_cast<const T*>(a.b_up);
  const T* res = static_cast<const T*>(a.res);
  T* y = static_cast<T*>(a.y);
  T* z_out = static_cast<T*>(a.z);
  const T* gate = static_cast<const T*>(a.gate);
  float scale = a.scale;

  // The block's rows, as a list: rows m0.. or, in a multi-adapter batch, one adapter's rows.
  __shared__ int64_t rows_s[kRowBlock];
  __shared__ int adapter_s;
  const AdapterSegments& seg = a.segments;
  if (seg.num_adapters > 0) {
    const int64_t b = blockIdx.x;
    const int L = seg.num_adapters;
    if (threadIdx.x == 0) {  // the last segment l in [0, L + 1] with block_start[l] <= b; L + 1 = past the end
      int lo = 0, hi = L + 1;
      while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;  // (lo + hi + 1) / 2 would wrap for L near 2^31
        if (seg.block_start[mid] <= b)
          lo = mid;
        else
          hi = mid - 1;
      }
      adapter_s = lo;
    }
    __syncthreads();
    const int l = adapter_s;  // uniform over the block: the returns below are taken by all threads
    if (l > L) return;        // an idle block of the grid's upper bound
    const int64_t start = seg.seg_start[l] + (b - seg.block_start[l]) * kRowBlock;
    const int64_t count = seg.seg_start[l + 1] - start;
    if (threadIdx.x < kRowBlock) rows_s[threadIdx.x] = threadIdx.x < count ? seg.order[start + threadIdx.x] : -1;
    if (l == L) {  // rows of no adapter: y = res
      __syncthreads();
      copy_rows(res, y, n_out, RowList{rows_s}, vec.res && vec.y);
      return;
    }
    w_down += l * seg.w_down_stride;
    w_up += l * seg.w_up_stride;
    if (b_down) b_down += l * seg.b_down_stride;
    if (b_up) b_up += l * seg.b_up_stride;
    if (seg.scales) scale = seg.scales[l];
  } else if (threadIdx.x < kRowBlock) {
    const int64_t row = int64_t(blockIdx.x) * kRowBlock + threadIdx.x;
    rows_s[threadIdx.x] = row < a.rows ? row : -1;
  }
  __syncthreads();
  const RowList rows{rows_s};

  SeedOffset so{0, 0};
  if (a.dropout.p > 0.f) {
    so = resolve_seed_offset(a.dropout);
    if (a.dropout.seed_offset_out && blockIdx.x == 0 && threadIdx.x == 0) {
      a.dropout.seed_offset_out[0] = int64_t(so.seed);
      a.dropout.seed_offset_out[1] = int64_t(so.offset);
    }
  }

  // ---- phase 1: down-projection of this block's rows
  typename M::Acc acc[RP / 16];
  stream_rows_times_weight<T, RP, true>(acc, static_cast<const T*>(a.x), rows, n_in, w_down, r, shared_region, vec.x,
                                        vec.w_down, a.dropout.p, so);

  // bias + activation, fragment by fragment through this warp's scratch
  {
    const int rr = lane >> 1, c0 = (lane & 1) * 8;
    const int64_t grow = rows(wrow + rr);
#pragma unroll
    for (int j = 0; j < RP / 16; ++j) {
      wmma::store_matrix_sync(scr, acc[j], C::kLdScr, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int col = j * 16 + c0 + e;
        const bool valid = col < r;
        const float z = scr[rr * C::kLdScr + c0 + e] + ((b_down && valid) ? to_float(b_down[col]) : 0.f);
        if (z_out && valid && grow >= 0) z_out[grow * r + col] = from_float<T>(z);
        h_s[(wrow + rr) * C::kLdH + col] = from_float<T>(valid ? activation_fn(a.activation, z) : 0.f);
      }
      __syncwarp();
    }
  }

  // ---- phase 2: up-projection, scale, bias and residual, one column chunk at a time
  auto wu_stage = [&](int s) { return shared_region + s * C::kUpStageStride; };
  auto res_stage = [&](int s) { return shared_region + s * C::kUpStageStride + C::kBN * C::kLdH; };
  auto load_chunk = [&](int nc, int s) {
    const int64_t n0 = int64_t(nc) * C::kBN;
    load_tile<T, C::kBN, RP, C::kLdH, kRowThreads>(wu_stage(s), w_up, r, RowRange{n0, n_out}, 0, r, vec.w_up);
    load_tile<T, kRowBlock, C::kBN, C::kLdRes, kRowThreads>(res_stage(s), res, n_out, rows, n0, n_out, vec.res);
  };
  const int nn = static_cast<int>(ceil_div<int64_t>(n_out, C::kBN));  // n_out + kBN would wrap near INT32_MAX
  load_chunk(0, 0);
  cp_async_commit();
  for (int nc = 0; nc < nn; ++nc) {
    if (nc + 1 < nn) load_chunk(nc + 1, (nc + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // chunk nc landed (and this warp's h rows are visible to all its lanes)
    const int s = nc & 1;

    typename M::Acc acc2[C::kBN / 16];
#pragma unroll
    for (int f = 0; f < C::kBN / 16; ++f) wmma::fill_fragment(acc2[f], 0.f);
#pragma unroll
    for (int k = 0; k < RP; k += M::kK) {
      typename M::template A<wmma::row_major> fa;
      fa.load(h_s + a_at<wmma::row_major>(wrow, k, C::kLdH), C::kLdH);
#pragma unroll
      for (int f = 0; f < C::kBN / 16; ++f) {
        typename M::template B<wmma::col_major> fb;  // B(k, n) = w_up[n0 + n][k]
        fb.load(wu_stage(s) + b_at<wmma::col_major>(k, f * 16, C::kLdH), C::kLdH);
        M::mma(acc2[f], fa, fb);
      }
    }
#pragma unroll
    for (int f = 0; f < C::kBN / 16; ++f)
      wmma::store_matrix_sync(scr + f * 16, acc2[f], C::kLdScr, wmma::mem_row_major);
    __syncwarp();

    const int64_t n0 = int64_t(nc) * C::kBN;
    constexpr int kVecsPerRow = C::kBN / 8;
    for (int i = lane; i < 16 * kVecsPerRow; i += 32) {
      const int rr = i / kVecsPerRow, c = (i % kVecsPerRow) * 8;
      const int64_t grow = rows(wrow + rr);
      const int64_t left = n_out - (n0 + c);
      if (grow < 0 || left <= 0) continue;
      const int valid = left < 8 ? static_cast<int>(left) : 8;
      const T* rs = res_stage(s) + (wrow + rr) * C::kLdRes + c;
      const float gscale = gate ? scale * to_float(gate[grow]) : scale;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float bias = (b_up && e < valid) ? to_float(b_up[n0 + c + e]) : 0.f;
        v[e] = to_float(rs[e]) + gscale * (scr[rr * C::kLdScr + c + e] + bias);
      }
      store8<T>(y + grow * n_out + n0 + c, v, vec.y, valid);
    }
    __syncthreads();  // everyone is done with stage s before it is refilled
  }
}

}  // namespace

int lowrank_forward_smem_bytes(DType dtype, int r) {
  int bytes = 0;
  dispatch_dtype(dtype, [&](auto t) {
    return dispatch_padded_rank(std::min(r, kLowRankMaxFusedRank), [&](auto rank) {
      bytes = FwdCfg<typename decltype(t)::type, decltype(rank)::value>::kSmemBytes;
      return cudaSuccess;
    });
  });
  return bytes;
}

cudaError_t lowrank_forward(const LowRankForwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.r < 1 || a.r > kLowRankMaxFusedRank || a.n_in < 1 || a.n_out < 1 || !a.res || !a.y)
    return cudaErrorInvalidValue;
  const AdapterSegments& seg = a.segments;
  // (segments with dropout: block 0 may be a copy or idle block and would not publish the seed)
  if (seg.num_adapters > 0 && (!seg.order || !seg.seg_start || !seg.block_start || a.dropout.p > 0.f))
    return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto dtype) {
    return dispatch_padded_rank(a.r, [&](auto rank) {
      using T = typename decltype(dtype)::type;
      constexpr int RP = decltype(rank)::value;
      using C = FwdCfg<T, RP>;
      constexpr int V = kVec<T>;
      const bool in_vec = a.n_in % V == 0, out_vec = a.n_out % V == 0;
      const FwdVec vec{in_vec && is_aligned16(a.x), out_vec && is_aligned16(a.res), out_vec && is_aligned16(a.y),
                       in_vec && is_aligned16(a.w_down), a.r % V == 0 && is_aligned16(a.w_up)};
      auto kernel = lowrank_forward_kernel<T, RP>;
      cudaError_t err = set_smem_limit(kernel, C::kSmemBytes);
      if (err != cudaSuccess) return err;
      // Multi-adapter: the L + 1 segments' sum_l ceil(count_l / 64) <= ceil(rows / 64) + L blocks
      // (one more is spare); the spare ones exit.
      const int64_t blocks = ceil_div<int64_t>(a.rows, kRowBlock) + (seg.num_adapters > 0 ? seg.num_adapters + 1 : 0);
      if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
      kernel<<<static_cast<unsigned>(blocks), kRowThreads, C::kSmemBytes, stream>>>(a, vec);
      return cudaGetLastError();
    });
  });
}

}  // namespace peftkern::kernels
