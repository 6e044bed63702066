#include "cpu/attention.h"

#include <ATen/ATen.h>

#include <limits>

namespace peftkern::cpu {
namespace {

at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Per-sample prefix [B, Hkv, P, D]: the shared one expanded, or each sample's task.
at::Tensor per_sample(const at::Tensor& prefix, const std::optional<at::Tensor>& ids, int64_t B) {
  if (ids) return prefix.index_select(0, ids->to(at::kLong));
  return prefix.unsqueeze(0).expand({B, prefix.size(0), prefix.size(1), prefix.size(2)});
}

struct Probs {
  at::Tensor keys, values, p;  // K', V' [B, H, P+S, D] (kv heads repeated), p [B, H, L, P+S]
  at::Tensor lse;              // [B, H, L]
};

Probs probabilities(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                    const at::Tensor& prefix_v, const std::optional<at::Tensor>& ids, bool causal, double scale) {
  const auto mt = math_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Hkv = k.size(1), S = k.size(2), P = prefix_k.size(-2);
  const int64_t G = H / Hkv;
  Probs r;
  r.keys = at::cat({per_sample(prefix_k, ids, B), k}, 2).to(mt).repeat_interleave(G, 1);
  r.values = at::cat({per_sample(prefix_v, ids, B), v}, 2).to(mt).repeat_interleave(G, 1);
  at::Tensor scores = at::matmul(q.to(mt), r.keys.transpose(-1, -2)).mul_(scale);
  if (causal) {  // the prefix is always visible; sequence key j when j <= i + (S - L)
    const at::Tensor i = at::arange(L, q.options().dtype(at::kLong)).unsqueeze(1);
    const at::Tensor col = at::arange(P + S, q.options().dtype(at::kLong)).unsqueeze(0);
    const at::Tensor visible = (col < P).logical_or(col - P <= i + (S - L));
    scores.masked_fill_(visible.logical_not(), -std::numeric_limits<double>::infinity());
  }
  r.lse = at::logsumexp(scores, -1);
  const at::Tensor none = at::isinf(r.lse).unsqueeze(-1);  // rows that see no key
  r.p = at::where(none, at::zeros({}, scores.options()), (scores - r.lse.unsqueeze(-1)).exp());
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                            const std::optional<at::Tensor>& prefix_ids, bool causal,
                                                            double scale) {
  const Probs r = probabilities(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale);
  return {at::matmul(r.p, r.values).to(q.scalar_type()), r.lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_ids, const at::Tensor& out, bool causal,
    double scale, std::array<bool, 5> need) {
  const auto [need_dq, need_dk, need_dv, need_dpk, need_dpv] = need;
  const auto mt = math_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), S = k.size(2), P = prefix_k.size(-2), D = q.size(3);
  const int64_t G = H / Hkv;
  const Probs r = probabilities(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale);
  const at::Tensor g = grad_out.to(mt);
  const at::Tensor delta = (g * out.to(mt)).sum(-1, true);
  const at::Tensor ds = r.p * (at::matmul(g, r.values.transpose(-1, -2)) - delta);
  at::Tensor dq, dk, dv, dpk, dpv;
  if (need_dq) dq = at::matmul(ds, r.keys).mul_(scale).to(q.scalar_type());
  // [B, H, P+S, D] -> summed over each kv head's G query heads -> [B, Hkv, P+S, D]
  auto per_kv_head = [&](const at::Tensor& t) { return t.view({B, Hkv, G, P + S, D}).sum(2); };
  auto prefix_part = [&](const at::Tensor& t) {  // summed over the samples that use each prefix
    const at::Tensor part = t.narrow(2, 0, P);
    if (!prefix_ids) return part.sum(0).to(prefix_k.scalar_type());
    return at::zeros(prefix_k.sizes(), part.options()).index_add_(0, prefix_ids->to(at::kLong), part).to(prefix_k.scalar_type());
  };
  if (need_dk || need_dpk) {
    const at::Tensor dkp = per_kv_head(at::matmul(ds.transpose(-1, -2), q.to(mt)).mul_(scale));
    if (need_dk) dk = dkp.narrow(2, P, S).to(k.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    if (need_dpk) dpk = prefix_part(dkp);
  }
  if (need_dv || need_dpv) {
    const at::Tensor dvp = per_kv_head(at::matmul(r.p.transpose(-1, -2), g));
    if (need_dv) dv = dvp.narrow(2, P, S).to(v.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    if (need_dpv) dpv = prefix_part(dvp);
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace peftkern::cpu
