// Launchers of the mask-tuning kernels (Piggyback, Zhao et al. 2020): binary masks m = scores >
// threshold over a frozen weight, straight-through gradients, bit-packed masks. No torch.
//
// Packed masks: int32 words [rows, mask_words(cols)]; bit j (least significant = 0) of word w of
// row n is element (n, 32 w + j); 1 = kept; bits past cols are 0. A mask costs 1 bit per weight,
// 1/16 of a bf16 masked weight. The comparison is strict and in float32:
// kept <=> float(score) > float(threshold) (a NaN score is dropped).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace peftkern::kernels {

// One pass over [rows, cols]: the mask from scores (or from bits_in when scores is null), written
// as w_eff = weight * mask (when w_eff is set) and as bits (when bits_out is set).
struct MaskApplyArgs {
  DType w_dtype, s_dtype;  // scores are float32 or the weight's dtype
  int64_t rows, cols;
  float threshold;
  const void* weight;      // [rows, cols]; may be null when only bits are written
  const void* scores;      // [rows, cols], or null
  const int32_t* bits_in;  // [rows, words] when scores is null
  void* w_eff;             // [rows, cols] in w_dtype, or null
  int32_t* bits_out;       // [rows, words], or null
};
cudaError_t mask_apply(const MaskApplyArgs& args, cudaStream_t stream);

// Straight-through backward from G = dL/dW_eff [rows, cols] (w_dtype): d_scores = G * weight
// (s_dtype), d_weight = G * mask (w_dtype); either may be null. One pass.
struct MaskSteArgs {
  DType w_dtype, s_dtype;
  int64_t rows, cols;
  const void* grad_w_eff;
  const void* weight;
  const int32_t* bits;
  void* d_scores;
  void* d_weight;
};
cudaError_t mask_ste_backward(const MaskSteArgs& args, cudaStream_t stream);

// out[t, n] = sum_k x[t, k] * weight[n, k] * mask[n, k] (+ bias[n]) for up to
// kMaskedMatvecMaxTokens tokens, the mask applied while weight is read (nothing materialised):
// a bandwidth-bound pass over weight plus the mask source (scores, or bits: 1/16 of a bf16 weight).
// With task_ids, token t uses bits + task_ids[t] * n_out * words; an id outside [0, tasks) means no
// mask (the host checks the range, except under CUDA graph capture: the kernel bounds it).
constexpr int kMaskedMatvecMaxTokens = 16;
struct MaskedMatvecArgs {
  DType dtype, s_dtype;  // x, weight, bias, out share dtype
  int64_t tokens, n_in, n_out;
  float threshold;
  const void* x;            // [tokens, n_in]
  const void* weight;       // [n_out, n_in]
  const void* bias;         // [n_out] or null
  const void* scores;       // [n_out, n_in], or null: then bits
  const int32_t* bits;      // [n_out, words] or, with task_ids, [tasks, n_out, words]
  const int64_t* task_ids;  // [tokens] or null
  int64_t tasks;            // with task_ids: the stack's first dimension
  void* out;                // [tokens, n_out]
};
cudaError_t masked_matvec(const MaskedMatvecArgs& args, cudaStream_t stream);

}  // namespace peftkern::kernels
