// Prefix attention by ATen ops (any device): builds [prefix; sequence] K/V, so it is the CPU path
// and, on CUDA, the slow path for what the fused kernels do not cover (float32, float64, head dims
// other than 64 and 128). Inputs already checked. Math in float32 (float64 for float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace peftkern::cpu {

// (out [B, H, L, D] in q's dtype, lse [B, H, L] float32; rows that see no key: 0 and -inf)
std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                            const std::optional<at::Tensor>& prefix_ids, bool causal,
                                                            double scale);

// (dq, dk, dv, dprefix_k, dprefix_v); undefined where need is false. Prefix gradients are summed
// over the samples that use each prefix.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_ids, const at::Tensor& out, bool causal,
    double scale, std::array<bool, 5> need);

}  // namespace peftkern::cpu
