// Launchers of the prefix-attention kernels: attention over [prefix KV; sequence KV] without
// building the concatenation. No torch.
//
//   K' = [prefix_k ; k], V' = [prefix_v ; v]   (along the key axis, per sample)
//   out = softmax(q @ K'^T * scale + mask) @ V'
//
// q [B, H, L, D]; k, v [B, Hkv, S, D] (query head h reads kv head h / (H / Hkv)); prefix_k,
// prefix_v [Hkv, P, D] shared by the batch, or [T, Hkv, P, D] with prefix_ids [B] choosing each
// sample's task. Causal: every query sees the whole prefix, and sequence key j when
// j <= i + (S - L) (bottom-right aligned). A query that sees no key outputs 0 (lse = -inf).
// Statistics in float32 (online softmax); fp16 and bf16, D = 64 or 128 (kAttentionHeadDims).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace peftkern::kernels {

// A [B, heads, rows, D] operand: strides in elements of batch, head and row; D is contiguous.
struct AttnOperand {
  const void* ptr;
  int64_t stride_b, stride_h, stride_row;
};

struct PrefixAttentionArgs {
  DType dtype;  // float16 or bfloat16
  int B, H, Hkv, L, S, P, D;
  float scale;
  bool causal;
  AttnOperand q, k, v;
  const void* prefix_k;       // [T, Hkv, P, D] or [Hkv, P, D], contiguous
  const void* prefix_v;
  const int64_t* prefix_ids;  // [B] task of each sample, or null (one shared prefix)
  int num_tasks;              // T (1 when shared)
};

constexpr bool attention_head_dim_supported(int d) { return d == 64 || d == 128; }

// out [B, H, L, D] (contiguous), lse [B, H, L] float32 (natural log; saved for the backward).
cudaError_t prefix_attention_forward(const PrefixAttentionArgs& args, void* out, float* lse, cudaStream_t stream);

struct PrefixAttentionGrads {
  const void* grad_out;  // [B, H, L, D] contiguous
  const void* out;       // the forward's output, contiguous
  const float* lse;      // the forward's
  // Outputs, contiguous; null = not requested.
  void* dq;              // [B, H, L, D]
  void* dk;              // [B, Hkv, S, D]
  void* dv;
  void* dprefix_k;       // [T, Hkv, P, D]: summed over the samples that use each prefix
  void* dprefix_v;
  int num_sms;
  void* workspace;
  size_t workspace_bytes;
};

size_t prefix_attention_backward_workspace_bytes(const PrefixAttentionArgs& args, const PrefixAttentionGrads& grads);

// delta = rowsum(grad_out * out); then one kernel per key block for dK, dV (and the prefix's
// per-sample partials), one per query block for dQ, and a fixed-order sum of the prefix partials
// over the samples of each task. Deterministic; no atomics.
cudaError_t prefix_attention_backward(const PrefixAttentionArgs& args, const PrefixAttentionGrads& grads,
                                      cudaStream_t stream);

}  // namespace peftkern::kernels
