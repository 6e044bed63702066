// Launchers of the prefix-attention kernels: the prefix part of
//
//   out = softmax(q [prefix_k ; k]^T * scale + [c ; mask]) [prefix_v ; v]      (c: the optional prefix bias)
//
// computed apart from the sequence part and merged with it. The sequence part (q against k, v) is
// PyTorch's fused attention, which returns its output out_s and row log-sum-exp lse_s; these
// kernels attend each query row to its task's P prefix keys (always visible: no mask, only
// the optional bias c below) and merge:
//
//   lse = log(exp(lse_s) + exp(lse_p)),  out = exp(lse_s - lse) out_s + exp(lse_p - lse) out_p
//
// The backward needs no sequence-part help: with the merged out and lse, each part's probabilities
// are exp(s - lse), and delta = rowsum(dO * out) spans both parts, so the fused kernel's backward
// (given the merged out and lse) gives the sequence part's exact gradients and these kernels the
// prefix part's. No torch.
//
// Layout: q [B, H, L, D]; prefix_k, prefix_v [T, Hkv, P, D] (T = 1: one prefix shared by the batch)
// with prefix_ids [B] choosing each sample's task; query head h reads kv head h / (H / Hkv). A block
// owns up to 64 query rows of one (sample, kv head): the H / Hkv heads' L rows, row r = g * L + i
// for head kv_head * G + g, so the prefix tile it keeps in shared memory serves every query head of
// its group. fp16 and bf16; D <= 256 with D % 8 == 0. Tensor cores (mma.sync m16n8k16), float32
// statistics. Row statistics use the natural log; a row that sees no key has lse = +inf (as
// FlashAttention writes it: every probability exp(s - lse) of the backward is then 0) and out 0.
//
// An optional gate g [B, H, L] (UniPELT's per-token gate) scales the prefix's share of each row:
//   out = exp(lse_s - lse) out_s + g exp(lse_p - lse) out_p      (lse unchanged: the joint softmax)
// Its backward is the same with the prefix values read as g pv: the prefix part's dO v^T and probs
// carry g, delta = rowsum(grad_out * out) still holds, and dgate = rowsum(p * (grad_out pv^T)).
//
// An optional additive bias c [B, H, L, P] over the prefix scores (T5's relative position bias for
// the prefix keys; any strides, stride 0 on broadcast dims): the prefix part's scores are
//   s_p = q pk^T * scale + c
// in the forward and in the backward's recomputed probabilities p = exp(s_p - lse). No gradient is
// computed for it. The sequence part's mask is the fused attention's business, not these kernels'.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace peftkern::kernels {

// A [B, heads, rows, D] tensor: element (b, h, i, d) at ptr + b * sb + h * sh + i * sr + d. The
// kernels read and write it two elements at a time: ptr 4-byte aligned, strides even.
struct AttnRows {
  void* ptr;
  int64_t sb, sh, sr;
};

// A [B, H, L] float32 tensor of row statistics (log-sum-exp).
struct AttnStats {
  float* ptr;
  int64_t sb, sh, sr;
};

// The optional per-row gate [B, H, L] in the input dtype (any strides: a [B, 1, L] gate expanded
// over the heads has sh = 0); ptr null = no gate.
struct AttnGate {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};

// The optional additive bias over the prefix scores [B, H, L, P] in the input dtype: element
// (b, h, i, p) at ptr + b * sb + h * sh + i * sr + p * sp (any strides; 0 on broadcast dims; read
// one element at a time); ptr null = no bias.
struct AttnBias {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sr = 0, sp = 0;
};

struct PrefixAttentionShape {
  DType dtype;  // float16 or bfloat16
  int B, H, Hkv, L, P, D;
  float scale;
  const void* prefix_k;  // [T, Hkv, P, D] contiguous, 16-byte aligned
  const void* prefix_v;
  const int64_t* prefix_ids;  // [B], or null (T = 1). An id outside [0, T) attends to no prefix.
  int num_tasks;              // T
  AttnGate gate;              // g, or none
  AttnBias bias;              // c, or none
};

// The prefix kernels cover this dtype and head dim.
bool prefix_attention_supported(DType dtype, int head_dim);

// Query rows per block: the grid is B * Hkv * ceil((H / Hkv) * L / 64) blocks, which must fit in 31 bits.
constexpr int kPrefixAttentionRowsPerBlock = 64;

// out = merge(sequence part, prefix part), lse = its row log-sum-exp. seq_out / seq_lse are the
// sequence part's (a row with lse_s = -inf has no visible sequence key, its out_s is not read; the
// caller marks such rows -inf whatever the attention kernel wrote; +inf or NaN makes the row NaN);
// seq_out.ptr = null when there are no sequence keys (S = 0). out may alias seq_out (in place);
// lse must not alias seq_lse.
struct PrefixAttentionForward {
  AttnRows q, seq_out, out;
  AttnStats seq_lse, lse;
};
cudaError_t prefix_attention_forward(const PrefixAttentionShape& shape, const PrefixAttentionForward& args,
                                     cudaStream_t stream);

// The prefix part's backward, given the merged out and lse:
//   p = exp(q pk^T * scale + c - lse),  ds = p * (grad_out pv^T - rowsum(grad_out * out))
//   dq (+)= scale * ds @ pk                       when dq.ptr (added to dq when dq_accumulate)
//   probs[b, h, i, :P] = p                        when probs (row stride probs_ld >= P)
//   dscores[b, h, i, :P] = scale * ds             when dscores (row stride probs_ld)
//   dgate[b, h, i] = rowsum(p * (grad_out pv^T))  when dgate (float32 [B, H, L] contiguous)
// With a gate, p above is g * p and ds = p * (g grad_out pv^T - delta).
// probs / dscores: [B, H, L, probs_ld] contiguous in the input dtype, 4-byte aligned, probs_ld even;
// their columns P..probs_ld are written with zeros. dprefix_k = sum over the rows of each task of
// dscores^T q and dprefix_v of probs^T grad_out: GEMMs, left to the caller (cuBLAS).
struct PrefixAttentionBackward {
  AttnRows q, grad_out, out, dq;
  AttnStats lse;
  bool dq_accumulate;
  void* probs;
  void* dscores;
  int64_t probs_ld;
  float* dgate = nullptr;
};
cudaError_t prefix_attention_backward(const PrefixAttentionShape& shape, const PrefixAttentionBackward& args,
                                      cudaStream_t stream);

}  // namespace peftkern::kernels
