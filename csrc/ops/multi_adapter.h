// Batches where each token picks its own adapter out of L (lora_linear_multi, adapter_multi): the
// grouping of tokens by adapter, on the device for the fused kernel (AdapterSegments) and per
// adapter for the composite (for_each_adapter).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

#ifdef PEFTKERN_WITH_CUDA
#include "kernels/lowrank.h"
#endif

namespace peftkern::ops {

// Each token's adapter as a key in [0, L]: L for -1 and for out-of-range ids (possible only under
// CUDA graph capture, where the range check cannot read the ids).
inline at::Tensor adapter_key(const at::Tensor& ids, int64_t L) {
  const at::Tensor id64 = ids.to(at::kLong);
  return at::where((id64 < 0).logical_or(id64 >= L), at::scalar_tensor(L, id64.options()), id64);
}

// Tokens grouped by adapter: order = stable argsort of the key, counts [L + 1] per key.
inline std::pair<at::Tensor, at::Tensor> group_by_adapter(const at::Tensor& ids, int64_t L) {
  const at::Tensor key = adapter_key(ids, L);
  const at::Tensor order = at::argsort(key, /*stable=*/true);
  const at::Tensor counts = at::zeros({L + 1}, key.options()).scatter_add_(0, key, at::ones_like(key));
  return {order, counts};
}

// The tokens of one adapter in the composite: their row indices (counts read on the host) or, under
// CUDA graph capture (no host reads), a 0/1 mask over all rows, slower: every adapter reads every row.
// The masked form zeroes the other rows with where(), not a 0/1 product: 0 * inf is NaN, and an inf
// in another adapter's row (or in this adapter's weights) must not reach this adapter's results.
struct AdapterRows {
  at::Tensor idx, sel;  // one of the two: idx [count] int64, sel [rows, 1] bool
  // t's rows of this adapter: [count, ...] (idx), or t with the other rows zeroed (sel)
  at::Tensor gather(const at::Tensor& t) const { return idx.defined() ? t.index_select(0, idx) : keep(t); }
  // a product of gathered rows with the other rows zeroed again (a no-op with idx)
  at::Tensor keep(const at::Tensor& t) const { return idx.defined() ? t : at::where(sel, t, 0); }
  // dst[rows of this adapter] = src (src: gathered rows)
  void copy_into(at::Tensor& dst, const at::Tensor& src) const {
    if (idx.defined()) {
      dst.index_copy_(0, idx, src);
    } else {
      dst.copy_(at::where(sel, src, dst));
    }
  }
  // dst[rows of this adapter] += src
  void add_into(at::Tensor& dst, const at::Tensor& src) const {
    if (idx.defined()) {
      dst.index_add_(0, idx, src);
    } else {
      dst.add_(keep(src));
    }
  }
};

// fn(l, rows) for every adapter l, skipping those with no token where the counts are known.
template <typename Fn>
void for_each_adapter(const at::Tensor& ids, int64_t L, bool capture, Fn&& fn) {
  if (capture) {
    const at::Tensor key = adapter_key(ids, L).unsqueeze(1);
    for (int64_t l = 0; l < L; ++l) fn(l, AdapterRows{at::Tensor(), key.eq(l)});
    return;
  }
  const auto [order, counts] = group_by_adapter(ids, L);
  const at::Tensor n = counts.cpu();  // one device-to-host copy
  const int64_t* count = n.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (count[l] == 0) continue;
    fn(l, AdapterRows{order.narrow(0, start, count[l]), at::Tensor()});
    start += count[l];
  }
}

#ifdef PEFTKERN_WITH_CUDA
// The device-side grouping the fused forward reads (kernels::AdapterSegments), built without a host
// sync. copy_rest: the rows of no adapter get blocks that copy res into y (false when res is y).
// segments() points into the tensors, allocated on the current stream; the kernel is enqueued on
// the same stream, so freeing them right after the launch is safe (the caching allocator reuses
// memory in stream order; a side stream would need record_stream).
struct SegmentTensors {
  at::Tensor order, seg_start, block_start;
  int64_t L = 0;

  SegmentTensors(const at::Tensor& ids, int64_t num_adapters, bool copy_rest) : L(num_adapters) {
    // the launch's grid: ceil(rows / 64) + L + 1 blocks
    TORCH_CHECK_VALUE((ids.numel() + kernels::kLowRankRowsPerBlock - 1) / kernels::kLowRankRowsPerBlock + L + 1 <=
                          INT32_MAX,
                      "multi-adapter kernel: ", ids.numel(), " tokens and ", L,
                      " adapters exceed the grid's 2^31 - 1 blocks; split the batch");
    at::Tensor counts;
    std::tie(order, counts) = group_by_adapter(ids, L);
    const at::Tensor zero = at::zeros({1}, counts.options());
    seg_start = at::cat({zero, counts.cumsum(0)}).contiguous();  // [L + 2]
    at::Tensor blocks = (counts + (kernels::kLowRankRowsPerBlock - 1)).div(kernels::kLowRankRowsPerBlock, "floor");
    if (!copy_rest) blocks.narrow(0, L, 1).zero_();
    block_start = at::cat({zero, blocks.cumsum(0)}).contiguous();  // [L + 2]
  }

  kernels::AdapterSegments segments() const {
    kernels::AdapterSegments s;
    s.num_adapters = static_cast<int>(L);
    s.order = order.data_ptr<int64_t>();
    s.seg_start = seg_start.data_ptr<int64_t>();
    s.block_start = block_start.data_ptr<int64_t>();
    return s;
  }
};
#endif

}  // namespace peftkern::ops
