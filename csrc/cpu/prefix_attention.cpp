#include "cpu/prefix_attention.h"

#include <ATen/ATen.h>

#include <limits>

namespace peftkern::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// q [B, H, L, D] -> [B, Hkv, G * L, D] (row g * L + i of kv head j is query head j * G + g, query i):
// with keys [B, Hkv, N, D] one batched product serves every query head of a group.
at::Tensor grouped(const at::Tensor& t, int64_t Hkv) { return t.reshape({t.size(0), Hkv, -1, t.size(3)}); }

// Scores [B, H, L, N] = q keys^T * scale + bias, hidden keys at -inf.
at::Tensor scores(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& bias, bool causal, double scale) {
  const auto mt = attention_math_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Hkv = keys.size(1), N = keys.size(2);
  at::Tensor s = at::matmul(grouped(q.to(mt), Hkv), keys.to(mt).transpose(-1, -2)).mul_(scale).view({B, H, L, N});
  if (bias.defined()) s.add_(bias);
  if (causal) s.masked_fill_(causal_hidden(L, N, q.device()), -kInf);
  return s;
}

}  // namespace

at::ScalarType attention_math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor causal_hidden(int64_t L, int64_t N, at::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  return at::arange(N, opts).unsqueeze(0) > at::arange(L, opts).unsqueeze(1) + (N - L);
}

std::pair<at::Tensor, at::Tensor> attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                         const at::Tensor& bias, bool causal, double scale) {
  const auto mt = attention_math_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = keys.size(1), N = keys.size(2);
  const auto opts = q.options().dtype(mt);
  if (N == 0) return {at::zeros({B, H, L, D}, opts), at::full({B, H, L}, -kInf, opts)};
  const at::Tensor s = scores(q, keys, bias, causal, scale);
  const at::Tensor lse = at::logsumexp(s, -1);
  // rows with lse = -inf see no key: (-inf) - (-inf) would be NaN
  const at::Tensor p = (s - lse.unsqueeze(-1)).exp_().masked_fill_(at::isneginf(lse).unsqueeze(-1), 0);
  const at::Tensor out = at::matmul(grouped(p, Hkv), values.to(mt)).view({B, H, L, D});
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attend_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                               const at::Tensor& keys, const at::Tensor& values,
                                                               const at::Tensor& bias, bool causal, double scale,
                                                               const at::Tensor& lse, const at::Tensor& delta,
                                                               bool need_dq, bool need_dkeys, bool need_dvalues,
                                                               const at::Tensor& gate, at::Tensor* dgate) {
  const auto mt = attention_math_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = keys.size(1), N = keys.size(2);
  at::Tensor p = (scores(q, keys, bias, causal, scale) - lse.to(mt).unsqueeze(-1)).exp_();  // [B, H, L, N]
  const at::Tensor g = grouped(grad_out.to(mt), Hkv);
  const at::Tensor gm = gate.defined() ? gate.to(mt).unsqueeze(-1) : at::Tensor();  // [B, H, L, 1]
  at::Tensor dq, dkeys, dvalues;
  if (need_dq || need_dkeys || dgate) {
    at::Tensor dp = at::matmul(g, values.to(mt).transpose(-1, -2)).view({B, H, L, N});
    if (dgate) *dgate = (p * dp).sum(-1);
    if (gm.defined()) dp = dp * gm;
    const at::Tensor ds = grouped(p * (dp - delta.to(mt).unsqueeze(-1)), Hkv);  // [B, Hkv, G * L, N]
    if (need_dq) dq = at::matmul(ds, keys.to(mt)).mul_(scale).view({B, H, L, D});
    // the product over the G * L rows of a group sums the G query heads' contributions
    if (need_dkeys) dkeys = at::matmul(ds.transpose(-1, -2), grouped(q.to(mt), Hkv)).mul_(scale);
  }
  if (need_dvalues) dvalues = at::matmul(grouped(gm.defined() ? p * gm : p, Hkv).transpose(-1, -2), g);
  return {dq, dkeys, dvalues};
}

std::pair<at::Tensor, at::Tensor> merge_parts(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                              const at::Tensor& lse_b) {
  const auto mt = attention_math_dtype(out_a.scalar_type());
  // lse = -inf: the part has no visible key. +inf is a +inf score, which makes the row NaN, as in
  // eager softmax (callers mark key-less rows -inf first; see mark_rows_without_keys).
  const at::Tensor empty_a = at::isneginf(lse_a), empty_b = at::isneginf(lse_b);
  const at::Tensor la = lse_a.to(mt), lb = lse_b.to(mt);
  const at::Tensor m = at::maximum(la, lb);
  const at::Tensor none = m == -kInf;  // NaN stays NaN
  const at::Tensor m0 = m.masked_fill(none, 0);
  const at::Tensor wa = (la - m0).exp(), wb = (lb - m0).exp(), total = wa + wb;
  const at::Tensor lse = (m0 + total.log()).masked_fill_(none, kInf);
  auto part = [&](const at::Tensor& out, const at::Tensor& w, const at::Tensor& empty) {
    const at::Tensor c = (w / total).masked_fill_(none, 0).unsqueeze(-1);
    return c * out.to(mt).masked_fill(empty.unsqueeze(-1), 0);  // an unseen part's out may be garbage
  };
  return {part(out_a, wa, empty_a) + part(out_b, wb, empty_b), lse};
}

at::Tensor per_sample_prefix(const at::Tensor& prefix, const std::optional<at::Tensor>& ids, int64_t B) {
  if (!ids) return prefix.unsqueeze(0).expand({B, prefix.size(0), prefix.size(1), prefix.size(2)});
  return prefix.index_select(0, ids->to(at::kLong).clamp(0, prefix.size(0) - 1));
}

at::Tensor prefix_visibility(const at::Tensor& ids, int64_t num_tasks, at::ScalarType dtype) {
  const at::Tensor valid = ids.ge(0).logical_and_(ids.lt(num_tasks));
  return at::zeros({ids.size(0), 1, 1, 1}, ids.options().dtype(dtype))
      .masked_fill_(valid.logical_not().view({-1, 1, 1, 1}), -kInf);
}

at::Tensor sum_per_task(const at::Tensor& per_sample, const std::optional<at::Tensor>& ids, int64_t num_tasks) {
  if (!ids) return per_sample.sum(0);
  const int64_t B = per_sample.size(0);
  const at::Tensor one_hot = at::arange(num_tasks, ids->options().dtype(at::kLong))
                                 .unsqueeze(1)
                                 .eq(ids->to(at::kLong).unsqueeze(0));  // [T, B]
  std::vector<int64_t> shape(per_sample.sizes().begin(), per_sample.sizes().end());
  shape[0] = num_tasks;
  return at::mm(one_hot.to(per_sample.scalar_type()), per_sample.reshape({B, -1})).view(shape);
}

}  // namespace peftkern::cpu
