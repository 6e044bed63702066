// Prefix attention by ATen ops (any device), in the decomposition the CUDA path uses: attention of
// the queries to one part of the keys (the prefix, or the sequence) with that part's log-sum-exp,
// the merge of two parts, and a part's backward given the merged out and lse. This is the CPU
// path's prefix part and merge, the "math" sequence part (when PyTorch's flash attention is
// disabled, or on CUDA where no fused kernel fits), and the CUDA path's slow fallback (float32,
// float64, head dims the prefix kernels do not cover). Inputs already checked. Math in float32
// (float64 for float64 inputs).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

namespace peftkern::cpu {

at::ScalarType attention_math_dtype(at::ScalarType t);

// [L, N] bool, True where causal masking hides key j from query i: j > i + (N - L) (bottom-right
// aligned, so a query block at the end of a longer key sequence sees every earlier key).
at::Tensor causal_hidden(int64_t L, int64_t N, at::Device device);

// Softmax attention of q [B, H, L, D] to keys, values [B, Hkv, N, D] (query head h reads kv head
// h / (H / Hkv)), plus an additive bias broadcastable to [B, H, L, N] (undefined: none), keys j
// > i + (N - L) hidden from query i when causal. Returns (out [B, H, L, D], lse [B, H, L]) in the
// math dtype; a row that sees no key has out 0 and lse -inf.
std::pair<at::Tensor, at::Tensor> attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                         const at::Tensor& bias, bool causal, double scale);

// The gradients of one part, given the merged lse (+inf for a row that saw no key) and delta =
// rowsum(grad_out * out) of the merged out: (dq [B, H, L, D], dkeys, dvalues [B, Hkv, N, D]) in the
// math dtype, each undefined unless requested. gate [B, H, L] (undefined: none): the part's rows
// were scaled by it (its values read as gate * values); dgate, when not null, gets rowsum(p *
// (grad_out values^T)) [B, H, L], the gate's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attend_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                               const at::Tensor& keys, const at::Tensor& values,
                                                               const at::Tensor& bias, bool causal, double scale,
                                                               const at::Tensor& lse, const at::Tensor& delta,
                                                               bool need_dq, bool need_dkeys, bool need_dvalues,
                                                               const at::Tensor& gate = at::Tensor(),
                                                               at::Tensor* dgate = nullptr);

// Merges two parts' (out, lse): lse = log(exp(lse_a) + exp(lse_b)), out = exp(lse_a - lse) out_a +
// exp(lse_b - lse) out_b. An lse of -inf marks a part the row does not see (its out is not used);
// +inf (a +inf score) or NaN makes the row NaN.
// Returns the math dtype; a row that sees neither part: out 0, lse +inf.
std::pair<at::Tensor, at::Tensor> merge_parts(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                              const at::Tensor& lse_b);

// Each sample's prefix [B, Hkv, P, D]: the shared one expanded, or its task's. An id outside
// [0, T) (possible only under CUDA graph capture, where ids are not checked) reads prefix 0; the
// caller hides it with prefix_visibility.
at::Tensor per_sample_prefix(const at::Tensor& prefix, const std::optional<at::Tensor>& ids, int64_t B);

// The additive bias [B, 1, 1, 1] that hides the prefix from samples whose id is outside [0, T).
at::Tensor prefix_visibility(const at::Tensor& ids, int64_t num_tasks, at::ScalarType dtype);

// Per-sample gradients [B, ...] summed over the samples of each task -> [T, ...] (or over all
// samples -> [...] when ids is empty), by a matmul with the one-hot matrix: deterministic, no atomics.
at::Tensor sum_per_task(const at::Tensor& per_sample, const std::optional<at::Tensor>& ids, int64_t num_tasks);

}  // namespace peftkern::cpu
