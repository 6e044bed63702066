// peftkern::prefix_attention_forward / prefix_attention_backward: checks, then the CPU composite, or
// on CUDA the flash-style kernels of csrc/kernels/attention.h (fp16/bf16, head dim 64 or 128;
// anything else takes the composite, which builds the concatenation).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "cpu/attention.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/attention.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "prefix_attention";

struct Dims {
  int64_t B, H, Hkv, L, S, P, D, tasks;  // tasks = 0: one prefix shared by the batch
};

// check_id_values: read prefix_ids' range on the host (the forward); the backward skips that sync.
Dims check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                     const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_ids, bool check_id_values) {
  check_floating(q, kOp, "q");
  check_like(k, kOp, "k", q, "q");
  check_like(v, kOp, "v", q, "q");
  check_like(prefix_k, kOp, "prefix_k", q, "q");
  check_like(prefix_v, kOp, "prefix_v", q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, kOp, ": q must have shape [B, H, L, D]; got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1, kOp, ": the head dim D must be at least 1; got q ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(3) == D, kOp, ": k must have shape [B, Hkv, S, D] with head dim D = ", D,
                    " (q's); got ", k.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B, kOp, ": k has batch ", k.size(0), " but q has batch ", B);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, kOp, ": q's heads H = ", H, " must be a multiple of k's heads Hkv = ", Hkv);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), kOp, ": v must have k's shape ", k.sizes(), "; got ", v.sizes());
  const bool per_task = prefix_k.dim() == 4;
  TORCH_CHECK_VALUE((prefix_k.dim() == 3 || per_task) && prefix_k.size(-3) == Hkv && prefix_k.size(-1) == D, kOp,
                    ": prefix_k must have shape [Hkv, P, D] = [", Hkv, ", P, ", D, "] or [T, ", Hkv, ", P, ", D,
                    "]; got ", prefix_k.sizes());
  TORCH_CHECK_VALUE(prefix_v.sizes() == prefix_k.sizes(), kOp, ": prefix_v must have prefix_k's shape ", prefix_k.sizes(),
                    "; got ", prefix_v.sizes());
  const int64_t P = prefix_k.size(-2), tasks = per_task ? prefix_k.size(0) : 0;
  TORCH_CHECK_VALUE(!per_task || prefix_ids, kOp, ": prefix_k holds ", tasks,
                    " task prefixes [T, Hkv, P, D]; prefix_ids [B] must say which one each sample uses");
  TORCH_CHECK_VALUE(per_task || !prefix_ids, kOp,
                    ": prefix_ids given but prefix_k is one shared prefix [Hkv, P, D]; per-task prefixes are [T, Hkv, P, D]");
  if (prefix_ids) check_ids(kOp, "prefix_ids", *prefix_ids, B, "B", q, "q", 0, tasks, "[0, T)", check_id_values);
  TORCH_CHECK_VALUE(L < INT32_MAX && S < INT32_MAX && P < INT32_MAX, kOp, ": sequence lengths must fit in 32 bits");
  return {B, H, Hkv, L, S, P, D, tasks};
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>, std::optional<at::Tensor>>;

#ifdef PEFTKERN_WITH_CUDA

bool fused(const at::Tensor& q, const Dims& d) {
  return (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
         kernels::attention_head_dim_supported(static_cast<int>(d.D)) && d.B <= 65535 && d.H <= 65535;  // grid y, z
}

// D-contiguous view, copied only if needed.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

kernels::AttnOperand operand(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

kernels::PrefixAttentionArgs kernel_args(const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& ids, bool causal,
                                         double scale) {
  kernels::PrefixAttentionArgs a{};
  a.dtype = kernel_dtype(q.scalar_type());
  a.B = static_cast<int>(d.B);
  a.H = static_cast<int>(d.H);
  a.Hkv = static_cast<int>(d.Hkv);
  a.L = static_cast<int>(d.L);
  a.S = static_cast<int>(d.S);
  a.P = static_cast<int>(d.P);
  a.D = static_cast<int>(d.D);
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.q = operand(q);
  a.k = operand(k);
  a.v = operand(v);
  a.prefix_k = pk.data_ptr();
  a.prefix_v = pv.data_ptr();
  a.prefix_ids = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  a.num_tasks = static_cast<int>(d.tasks > 0 ? d.tasks : 1);
  return a;
}

#endif  // PEFTKERN_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                     const std::optional<at::Tensor>& prefix_ids, bool causal,
                                                     double scale) {
  const Dims d = check_attention(q, k, v, prefix_k, prefix_v, prefix_ids, true);
#ifdef PEFTKERN_WITH_CUDA
  if (q.is_cuda() && fused(q, d)) {
    const c10::cuda::CUDAGuard guard(q.device());
    const at::Tensor qc = unit_last(q), kc = unit_last(k), vc = unit_last(v);
    const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
    const at::Tensor ids = prefix_ids ? prefix_ids->to(at::kLong).contiguous() : at::Tensor();
    at::Tensor out = at::empty({d.B, d.H, d.L, d.D}, q.options());
    at::Tensor lse = at::empty({d.B, d.H, d.L}, q.options().dtype(at::kFloat));
    C10_CUDA_CHECK(kernels::prefix_attention_forward(kernel_args(d, qc, kc, vc, pk, pv, ids, causal, scale),
                                                     out.data_ptr(), lse.data_ptr<float>(),
                                                     at::cuda::getCurrentCUDAStream()));
    return {out, lse};
  }
#endif
  return cpu::prefix_attention_forward(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale);
}

Grads attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& prefix_k, const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_ids,
                         const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, std::array<bool, 5> need) {
  const Dims d = check_attention(q, k, v, prefix_k, prefix_v, prefix_ids, false);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_attention_backward: grad_out and out must have q's shape");
#ifdef PEFTKERN_WITH_CUDA
  if (q.is_cuda() && fused(q, d)) {
    const c10::cuda::CUDAGuard guard(q.device());
    const at::Tensor qc = unit_last(q), kc = unit_last(k), vc = unit_last(v);
    const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
    const at::Tensor ids = prefix_ids ? prefix_ids->to(at::kLong).contiguous() : at::Tensor();
    const at::Tensor g = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
    const auto [need_dq, need_dk, need_dv, need_dpk, need_dpv] = need;
    at::Tensor dq = need_dq ? at::empty(q.sizes(), q.options()) : at::Tensor();
    at::Tensor dk = need_dk ? at::empty(k.sizes(), k.options()) : at::Tensor();
    at::Tensor dv = need_dv ? at::empty(v.sizes(), v.options()) : at::Tensor();
    at::Tensor dpk = need_dpk ? at::empty(prefix_k.sizes(), prefix_k.options()) : at::Tensor();
    at::Tensor dpv = need_dpv ? at::empty(prefix_v.sizes(), prefix_v.options()) : at::Tensor();
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
    const kernels::PrefixAttentionArgs a = kernel_args(d, qc, kc, vc, pk, pv, ids, causal, scale);
    kernels::PrefixAttentionGrads gr{};
    gr.grad_out = g.data_ptr();
    gr.out = o.data_ptr();
    gr.lse = l.data_ptr<float>();
    gr.dq = ptr(dq);
    gr.dk = ptr(dk);
    gr.dv = ptr(dv);
    gr.dprefix_k = ptr(dpk);
    gr.dprefix_v = ptr(dpv);
    gr.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    gr.workspace_bytes = kernels::prefix_attention_backward_workspace_bytes(a, gr);
    const at::Tensor workspace = at::empty({static_cast<int64_t>(gr.workspace_bytes)}, q.options().dtype(at::kByte));
    gr.workspace = workspace.data_ptr();
    C10_CUDA_CHECK(kernels::prefix_attention_backward(a, gr, at::cuda::getCurrentCUDAStream()));
    return {defined_or_none(dq), defined_or_none(dk), defined_or_none(dv), defined_or_none(dpk), defined_or_none(dpv)};
  }
#endif
  auto [dq, dk, dv, dpk, dpv] =
      cpu::prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_ids, out, causal, scale, need);
  return {defined_or_none(dq), defined_or_none(dk), defined_or_none(dv), defined_or_none(dpk), defined_or_none(dpv)};
}

void register_attention_impls(torch::Library& m) {
  m.impl("prefix_attention_forward", &attention_forward);
  m.impl("prefix_attention_backward", &attention_backward);
}

}  // namespace

// Each function branches on the device itself (the composite on the CPU, the kernels on CUDA).
TORCH_LIBRARY_IMPL(peftkern, CPU, m) { register_attention_impls(m); }
#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) { register_attention_impls(m); }
#endif

}  // namespace peftkern::ops
