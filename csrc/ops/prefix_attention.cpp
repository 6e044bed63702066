// peftkern::prefix_attention_forward / prefix_attention_backward. Attention over [prefix KV ;
// sequence KV] is computed as two parts and merged by their log-sum-exps (the algebra is in
// csrc/kernels/prefix_attention.h); nothing of size [B, Hkv, P + S, D] is built.
//   sequence part  PyTorch's fused attention through the aten ops that return the log-sum-exp and
//                  whose backward takes out and lse: on CUDA flash, then memory-efficient, then
//                  cuDNN, on the CPU its flash kernel, each where it supports the inputs and the
//                  user left it enabled (torch.nn.attention.sdpa_kernel, as for SDPA); otherwise the
//                  math composite of cpu/prefix_attention.h.
//   prefix part    CUDA, fp16/bf16, D % 8 == 0, D <= 256, sm_80+: the prefix + merge kernels of
//   and merge      kernels/prefix_attention.h; otherwise the composite of cpu/prefix_attention.h (labelled slow).
// prefix_gate and prefix_bias belong to the prefix part: both paths apply them there.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cpu/prefix_attention.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/prefix_attention.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "prefix_attention";
constexpr double kInf = std::numeric_limits<double>::infinity();

struct Dims {
  int64_t B, H, Hkv, L, S, P, D, tasks;  // tasks = 0: one prefix shared by the batch
  int64_t G() const { return H / Hkv; }
};

// t has at most 4 dims and broadcasts to target (torch's rule: aligned from the right, 1 or equal).
bool broadcasts_to(const at::Tensor& t, const std::array<int64_t, 4>& target) {
  bool ok = t.dim() <= 4;
  for (int64_t i = 1; ok && i <= t.dim(); ++i) ok = t.size(-i) == target[4 - i] || t.size(-i) == 1;
  return ok;
}

void check_mask(const at::Tensor& mask, const at::Tensor& q, const Dims& d) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(), kOp,
                   ": attn_mask must be a bool tensor (True = attend) or an additive mask of q's dtype ",
                   q.scalar_type(), "; got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == q.device(), kOp, ": attn_mask is on ", mask.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(broadcasts_to(mask, {d.B, d.H, d.L, d.S}), kOp,
                    ": attn_mask must be broadcastable to [B, H, L, S] = [", d.B, ", ", d.H, ", ", d.L, ", ", d.S,
                    "]; got ", mask.sizes());
}

// check_id_values: read prefix_ids' range on the host (the forward); the backward skips that sync.
Dims check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                     const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_ids,
                     const std::optional<at::Tensor>& attn_mask, bool check_id_values) {
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
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, kOp, ": q's heads H = ", H,
                    " must be a multiple of k's heads Hkv = ", Hkv);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), kOp, ": v must have k's shape ", k.sizes(), "; got ", v.sizes());
  const bool per_task = prefix_k.dim() == 4;
  TORCH_CHECK_VALUE((prefix_k.dim() == 3 || per_task) && prefix_k.size(-3) == Hkv && prefix_k.size(-1) == D, kOp,
                    ": prefix_k must have shape [Hkv, P, D] = [", Hkv, ", P, ", D, "] or [T, ", Hkv, ", P, ", D,
                    "]; got ", prefix_k.sizes());
  TORCH_CHECK_VALUE(prefix_v.sizes() == prefix_k.sizes(), kOp, ": prefix_v must have prefix_k's shape ",
                    prefix_k.sizes(), "; got ", prefix_v.sizes());
  const int64_t P = prefix_k.size(-2), tasks = per_task ? prefix_k.size(0) : 0;
  TORCH_CHECK_VALUE(!per_task || tasks >= 1, kOp, ": prefix_k holds no task prefix; got ", prefix_k.sizes());
  TORCH_CHECK_VALUE(!per_task || prefix_ids, kOp, ": prefix_k holds ", tasks,
                    " task prefixes [T, Hkv, P, D]; prefix_ids [B] must say which one each sample uses");
  TORCH_CHECK_VALUE(
      per_task || !prefix_ids, kOp,
      ": prefix_ids given but prefix_k is one shared prefix [Hkv, P, D]; per-task prefixes are [T, Hkv, P, D]");
  if (prefix_ids) check_ids(kOp, "prefix_ids", *prefix_ids, B, "B", q, "q", 0, tasks, "[0, T)", check_id_values);
  // The kernels take these as int; P leaves room for one 64-row step past it.
  TORCH_CHECK_VALUE(B < INT32_MAX && H < INT32_MAX && L < INT32_MAX && S < INT32_MAX && P < INT32_MAX - 64 &&
                        D < INT32_MAX && tasks < INT32_MAX,
                    kOp, ": batch (B), heads (H), lengths (L, S, P), head dim (D) and the task count (T) must fit in ",
                    "32 bits; got B=", B, " H=", H, " L=", L, " S=", S, " P=", P, " D=", D, " T=", tasks);
  const Dims d{B, H, Hkv, L, S, P, D, tasks};
  if (attn_mask) check_mask(*attn_mask, q, d);
  return d;
}

// The optional per-row gate of the prefix part: q's dtype and device, shape [B, H, L] (any strides).
void check_prefix_gate(const char* op, const std::optional<at::Tensor>& gate, const at::Tensor& q, const Dims& d) {
  if (!gate) return;
  check_like(*gate, op, "prefix_gate", q, "q");
  TORCH_CHECK_VALUE(gate->sizes() == at::IntArrayRef({d.B, d.H, d.L}), op, ": prefix_gate must have shape [B, H, L] = [",
                    d.B, ", ", d.H, ", ", d.L, "] (one value per query row; expand a [B, 1, L] gate); got ",
                    gate->sizes());
}

// The optional additive bias over the prefix scores: q's dtype and device, broadcastable to
// [B, H, L, P] (at most 4-D, aligned from the right as torch broadcasts).
void check_prefix_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& q, const Dims& d) {
  if (!bias) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == q.scalar_type(), op,
                   ": prefix_bias must be an additive float tensor of q's dtype ", q.scalar_type(), "; got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->device() == q.device(), op, ": prefix_bias is on ", bias->device(), " but q is on ",
                    q.device(), "; all inputs must be on one device");
  TORCH_CHECK_VALUE(broadcasts_to(*bias, {d.B, d.H, d.L, d.P}), op,
                    ": prefix_bias must be broadcastable to [B, H, L, P] = [", d.B, ", ", d.H, ", ", d.L, ", ", d.P,
                    "]; got ", bias->sizes());
}

// The checked bias as [B, H, L, P] (a view: stride 0 on broadcast dims), the kernels' layout.
at::Tensor expanded_prefix_bias(const at::Tensor& bias, const Dims& d) {
  at::Tensor b = bias;
  while (b.dim() < 4) b = b.unsqueeze(0);
  return b.expand({d.B, d.H, d.L, d.P});
}

// The default scale needs D, so it is resolved here, after the checks, not in Python.
double resolve_scale(const std::optional<double>& scale, const Dims& d) {
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
}

// ---------------------------------------------------------------- the sequence part

enum class SeqKernel { kNone, kFlash, kEfficient, kCudnn, kCpuFlash, kMath };

bool sm80_or_newer(const at::Tensor& q) {
#ifdef PEFTKERN_WITH_CUDA
  return q.is_cuda() && at::cuda::getDeviceProperties(q.get_device())->major >= 8;
#else
  (void)q;
  return false;
#endif
}

// The first enabled kernel that supports the inputs, in the order flash, memory-efficient, cuDNN
// (documented support; flash is the only one with bottom-right causal masking and grouped-query
// heads built in), then math. The backward picks again by the same rule.
SeqKernel sequence_kernel(const at::Tensor& q, const Dims& d, bool has_mask) {
  if (d.S == 0) return SeqKernel::kNone;
  const auto& ctx = at::globalContext();
  const auto dt = q.scalar_type();
  const bool half = dt == at::kHalf || dt == at::kBFloat16;
  const bool head_ok = d.D % 8 == 0 && d.D <= 256;
  if (q.is_cuda()) {
    const bool sm80 = sm80_or_newer(q);
    if (ctx.userEnabledFlashSDP() && half && sm80 && head_ok && !has_mask) return SeqKernel::kFlash;
    if (ctx.userEnabledMemEfficientSDP() && (half || dt == at::kFloat) && head_ok) return SeqKernel::kEfficient;
    if (ctx.userEnabledCuDNNSDP() && half && sm80 && head_ok && d.D <= 128 && d.S > 1) return SeqKernel::kCudnn;
  } else if (ctx.userEnabledFlashSDP()) {
    return SeqKernel::kCpuFlash;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(ctx.userEnabledMathSDP(), kOp, ": no enabled attention backend supports these inputs (",
                              q.device().type(), ", ", dt, ", head dim ", d.D, has_mask ? ", attn_mask" : "",
                              "); enable another one (torch.nn.attention.sdpa_kernel), e.g. the math backend");
  return SeqKernel::kMath;
}

// The sequence part's mask as its kernel takes it: an additive bias [b|1, h|1, L, S] (undefined:
// none) and the kernel's own causal flag. Flash and math mask bottom-right causally themselves; the
// others align causal masks top-left, which equals bottom-right only when L == S, so otherwise (and
// whenever there is an attn_mask) causality is folded into the bias.
struct SeqMask {
  at::Tensor bias;
  bool causal = false;
};

SeqMask sequence_mask(SeqKernel kern, const at::Tensor& q, const std::optional<at::Tensor>& attn_mask, bool causal,
                      const Dims& d) {
  SeqMask m;
  const bool bottom_right = kern == SeqKernel::kFlash || kern == SeqKernel::kMath;
  const bool fold = causal && (attn_mask || (!bottom_right && d.L != d.S));
  m.causal = causal && !fold;
  const auto dtype = kern == SeqKernel::kMath ? cpu::attention_math_dtype(q.scalar_type()) : q.scalar_type();
  if (attn_mask) {
    at::Tensor mask = *attn_mask;  // as [b|1, h|1, l|1, s|1]: the kernels take 2-D or 4-D masks only
    while (mask.dim() < 4) mask = mask.unsqueeze(0);
    m.bias = mask.scalar_type() == at::kBool
                 ? at::zeros(mask.sizes(), q.options().dtype(dtype)).masked_fill_(mask.logical_not(), -kInf)
                 : mask.to(dtype);
  }
  if (fold) {
    const at::Tensor hidden = cpu::causal_hidden(d.L, d.S, q.device());
    m.bias = (m.bias.defined() ? m.bias : at::zeros({d.L, d.S}, q.options().dtype(dtype))).masked_fill(hidden, -kInf);
  }
  return m;
}

// The memory-efficient and cuDNN kernels read the bias as [B, H, L, S] with 16-element aligned rows
// (what SDPA's front end prepares): padded and sliced, broadcast dims kept at stride 0.
at::Tensor bias_for_fused(const at::Tensor& bias, const Dims& d) {
  if (!bias.defined()) return bias;
  const at::Tensor b4 = bias.dim() == 4 ? bias : bias.view([&] {
    std::vector<int64_t> s(4 - bias.dim(), 1);
    s.insert(s.end(), bias.sizes().begin(), bias.sizes().end());
    return s;
  }());
  const int64_t padded = round_up<int64_t>(d.S, 16);
  at::Tensor storage = at::empty({b4.size(0), b4.size(1), d.L, padded}, bias.options());
  at::Tensor out = storage.narrow(3, 0, d.S);
  out.copy_(b4.expand({b4.size(0), b4.size(1), d.L, d.S}));
  return out.expand({d.B, d.H, d.L, d.S});
}

// k, v [B, Hkv, S, D] -> [B, H, S, D] for kernels without grouped-query heads.
at::Tensor expand_heads(const at::Tensor& t, const Dims& d) { return d.G() == 1 ? t : t.repeat_interleave(d.G(), 1); }
at::Tensor sum_heads(const at::Tensor& t, const Dims& d) {  // the reverse, for gradients
  return d.G() == 1 ? t : t.view({d.B, d.Hkv, d.G(), d.S, d.D}).sum(2);
}

// A tensor the fused kernels can read with 16-byte vector loads: last dim contiguous, base and
// other strides 16-byte aligned. Otherwise a fresh contiguous copy (.contiguous() would keep an
// already-contiguous view at an odd offset, e.g. the gradient slice torch.cat's backward hands on).
bool is_aligned16(const at::Tensor& t) {
  bool ok = t.numel() == 0 || (t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0);
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = (t.stride(i) * t.element_size()) % 16 == 0 || t.size(i) == 1;
  return ok;
}
at::Tensor aligned16(const at::Tensor& t) { return is_aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// The output layout of every path: [B, H, L, D] viewed over [B, L, H, D] memory, as PyTorch's flash
// and memory-efficient attention write it (so out.transpose(1, 2).reshape(B, L, H * D) is free).
at::Tensor out_like(const at::Tensor& q, const Dims& d) {
  return at::empty({d.B, d.L, d.H, d.D}, q.options()).transpose(1, 2);
}
bool has_out_layout(const at::Tensor& t, const Dims& d) {
  return t.strides() == at::IntArrayRef({d.L * d.H * d.D, d.D, d.H * d.D, 1}) && is_aligned16(t);
}

// t in that layout, 16-byte aligned: the memory-efficient backward reads out's row stride as H * D
// whatever the tensor says, and cuDNN's graph cache is safest with one layout for out and grad_out.
at::Tensor blhd(const at::Tensor& t, const Dims& d) { return has_out_layout(t, d) ? t : out_like(t, d).copy_(t); }

// Dropout is never used: the kernels read no philox state, but the backward signatures take tensors.
at::Tensor no_dropout_state(const at::Tensor& q) { return at::zeros({2}, q.options().dtype(at::kLong)); }

struct SeqOut {
  at::Tensor out;  // [B, H, L, D] in q's dtype (math dtype for kMath)
  at::Tensor lse;  // [B, H, L] float (a view: the kernel's own layout)
};

SeqOut sequence_forward(SeqKernel kern, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const SeqMask& m,
                        double scale, const Dims& d) {
  switch (kern) {
    case SeqKernel::kFlash: {
      auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, m.causal, false, scale);
      return {std::get<0>(r), std::get<1>(r)};
    }
    case SeqKernel::kEfficient: {
      auto r = at::_scaled_dot_product_efficient_attention(q, expand_heads(k, d), expand_heads(v, d),
                                                           defined_or_none(bias_for_fused(m.bias, d)), true, 0.0,
                                                           m.causal, scale);
      return {std::get<0>(r), std::get<1>(r).narrow(2, 0, d.L)};  // lse rows padded to a multiple of 32
    }
    case SeqKernel::kCudnn: {
      auto r = at::_scaled_dot_product_cudnn_attention(q, expand_heads(k, d), expand_heads(v, d),
                                                       defined_or_none(bias_for_fused(m.bias, d)), true, 0.0, m.causal,
                                                       false, scale);
      const at::Tensor lse = std::get<1>(r);
      return {std::get<0>(r), lse.dim() == 4 ? lse.select(3, 0) : lse};  // cuDNN: [B, H, L, 1]
    }
    case SeqKernel::kCpuFlash: {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, m.causal, defined_or_none(m.bias), scale);
      return {std::get<0>(r), std::get<1>(r)};
    }
    case SeqKernel::kMath: {
      auto [out, lse] = cpu::attend(q, k, v, m.bias, m.causal, scale);
      return {out, lse};
    }
    case SeqKernel::kNone: break;
  }
  return {};
}

// Marks rows that see no sequence key with lse = -inf, whatever the kernel wrote there (CPU flash
// writes 0, CUDA flash +inf): the merge then ignores their out.
void mark_rows_without_keys(at::Tensor& lse, const SeqMask& m, bool causal, const Dims& d) {
  if (m.bias.defined()) {
    const at::Tensor none = m.bias.isneginf().all(-1);  // [b|1, h|1, L]; a NaN entry is a (NaN) key
    lse.masked_fill_(none, -kInf);
  } else if (causal && d.L > d.S) {
    lse.narrow(2, 0, d.L - d.S).fill_(-kInf);
  }
}

// (dq, dk, dv) of the sequence part given the merged out and lse (and delta = rowsum(grad_out *
// out) for the math kernel); undefined where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_backward(SeqKernel kern, const at::Tensor& grad_out,
                                                                 const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& out,
                                                                 const at::Tensor& lse, const SeqMask& m, double scale,
                                                                 const Dims& d, std::array<bool, 3> need) {
  switch (kern) {
    case SeqKernel::kFlash: {
      // lse read as contiguous [B, H, L] float32; cum_seq_q/k undefined (defined ones select varlen)
      const at::Tensor philox = no_dropout_state(q);
      return at::_scaled_dot_product_flash_attention_backward(grad_out, q, k, v, out, lse.contiguous(), at::Tensor(),
                                                              at::Tensor(), d.L, d.S, 0.0, m.causal, philox, philox,
                                                              scale);
    }
    case SeqKernel::kEfficient: {
      // lse as its forward writes it: [B, H, L rounded up to 32], the padding +inf
      const at::Tensor lse_padded =
          at::full({d.B, d.H, round_up<int64_t>(d.L, 32)}, kInf, lse.options().dtype(at::kFloat));
      lse_padded.narrow(2, 0, d.L).copy_(lse);
      const at::Tensor philox = no_dropout_state(q);
      auto r = at::_scaled_dot_product_efficient_attention_backward(
          grad_out, q, expand_heads(k, d), expand_heads(v, d), bias_for_fused(m.bias, d), blhd(out, d), lse_padded,
          philox, philox, 0.0, {need[0], need[1], need[2], false}, m.causal, scale);
      return {std::get<0>(r), need[1] ? sum_heads(std::get<1>(r), d) : at::Tensor(),
              need[2] ? sum_heads(std::get<2>(r), d) : at::Tensor()};
    }
    case SeqKernel::kCudnn: {
      const at::Tensor philox = no_dropout_state(q);
      const at::Tensor lse4 = lse.contiguous().unsqueeze(-1);  // its forward's [B, H, L, 1]
      auto r = at::_scaled_dot_product_cudnn_attention_backward(
          blhd(grad_out, d), q, expand_heads(k, d), expand_heads(v, d), blhd(out, d), lse4, philox, philox,
          bias_for_fused(m.bias, d), at::Tensor(), at::Tensor(), d.L, d.S, 0.0, m.causal, scale);
      return {std::get<0>(r), sum_heads(std::get<1>(r), d), sum_heads(std::get<2>(r), d)};
    }
    case SeqKernel::kCpuFlash: {
      // the kernel reads lse in the layout its forward writes, [B, L, H] in memory
      const at::Tensor lse_blh = at::empty({d.B, d.L, d.H}, lse.options()).transpose(1, 2).copy_(lse);
      return at::_scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse_blh, 0.0, m.causal,
                                                                      defined_or_none(m.bias), scale);
    }
    case SeqKernel::kMath: {
      const auto mt = cpu::attention_math_dtype(q.scalar_type());
      const at::Tensor delta = (grad_out.to(mt) * out.to(mt)).sum(-1);
      auto [dq, dk, dv] =
          cpu::attend_backward(grad_out, q, k, v, m.bias, m.causal, scale, lse, delta, need[0], need[1], need[2]);
      auto as = [](const at::Tensor& g, const at::Tensor& like) { return g.defined() ? g.to(like.scalar_type()) : g; };
      return {as(dq, q), as(dk, k), as(dv, v)};
    }
    case SeqKernel::kNone: break;
  }
  return {};
}

// ---------------------------------------------------------------- the prefix part

at::ScalarType lse_dtype(const at::Tensor& q) {  // float64 for float64 (gradcheck), else float32
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
at::Tensor lse_like(const at::Tensor& q, const Dims& d) {
  return at::empty({d.B, d.H, d.L}, q.options().dtype(lse_dtype(q)));
}

// The composite's prefix part: each sample's prefix keys and values, and the additive bias of
// their scores: the user's prefix_bias (undefined: none) plus the one that hides them from samples
// whose id is outside [0, T).
struct PrefixKeys {
  at::Tensor keys, values, bias;
};
PrefixKeys prefix_keys(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                       const std::optional<at::Tensor>& ids, const at::Tensor& prefix_bias, const Dims& d) {
  const auto mt = cpu::attention_math_dtype(q.scalar_type());
  at::Tensor bias = ids ? cpu::prefix_visibility(*ids, d.tasks, mt) : at::Tensor();
  if (prefix_bias.defined()) bias = bias.defined() ? bias + prefix_bias.to(mt) : prefix_bias.to(mt);
  return {cpu::per_sample_prefix(prefix_k, ids, d.B), cpu::per_sample_prefix(prefix_v, ids, d.B), bias};
}

#ifdef PEFTKERN_WITH_CUDA

bool prefix_kernel_fits(const at::Tensor& q, const Dims& d) {
  const int64_t row_tiles = ceil_div<int64_t>(d.G() * d.L, kernels::kPrefixAttentionRowsPerBlock);
  const auto dt = q.scalar_type();
  return q.is_cuda() && (dt == at::kHalf || dt == at::kBFloat16) &&
         kernels::prefix_attention_supported(kernel_dtype(dt), static_cast<int>(d.D)) && sm80_or_newer(q) &&
         d.B * d.Hkv * row_tiles <= INT32_MAX;
}

kernels::AttnRows rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }
kernels::AttnStats stats(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

kernels::PrefixAttentionShape prefix_shape(const Dims& d, const at::Tensor& q, const at::Tensor& pk,
                                           const at::Tensor& pv, const at::Tensor& ids, double scale,
                                           const at::Tensor& gate, const at::Tensor& bias) {
  kernels::PrefixAttentionShape s{};
  s.dtype = kernel_dtype(q.scalar_type());
  s.B = static_cast<int>(d.B);
  s.H = static_cast<int>(d.H);
  s.Hkv = static_cast<int>(d.Hkv);
  s.L = static_cast<int>(d.L);
  s.P = static_cast<int>(d.P);
  s.D = static_cast<int>(d.D);
  s.scale = static_cast<float>(scale);
  s.prefix_k = pk.data_ptr();
  s.prefix_v = pv.data_ptr();
  s.prefix_ids = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  s.num_tasks = static_cast<int>(d.tasks > 0 ? d.tasks : 1);
  if (gate.defined()) s.gate = {gate.data_ptr(), gate.stride(0), gate.stride(1), gate.stride(2)};
  if (bias.defined() && d.P > 0)  // [B, H, L, P]
    s.bias = {bias.data_ptr(), bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3)};
  return s;
}

at::Tensor kernel_ids(const std::optional<at::Tensor>& ids) {
  return ids ? ids->to(at::kLong).contiguous() : at::Tensor();
}

// Per sample, sum over its rows of rows_ws^T @ x: rows_ws [n, H, L, ld] the kernel's per-row
// probabilities or scaled dS, x [n, H, L, D]. cuBLAS (float32 out) per head, then the sum over
// each kv-head group's heads (fixed order): [n, Hkv, P, D] float32.
at::Tensor prefix_grad_per_sample(const at::Tensor& rows_ws, const at::Tensor& x, const Dims& d) {
  const int64_t n = x.size(0), nH = n * d.H;
  const at::Tensor a = rows_ws.view({nH, d.L, rows_ws.size(3)}).narrow(2, 0, d.P).transpose(1, 2);  // [nH, P, L]
  const at::Tensor partial = at::bmm(a, x.reshape({nH, d.L, d.D}), at::kFloat);                     // [nH, P, D]
  return d.G() == 1 ? partial.view({n, d.Hkv, d.P, d.D}) : partial.view({n, d.Hkv, d.G(), d.P, d.D}).sum(2);
}

// The prefix part's backward on the kernels: dq (added to the sequence part's when dq_seq is
// defined), dprefix_k, dprefix_v (undefined unless requested). The kernel writes each row's
// probabilities and dS for cuBLAS to reduce; samples go in chunks so that workspace stays under
// max(64 MiB, a quarter of q), below what the eager formula's concatenated K/V hold.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_backward_on_kernels(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& prefix_ids, const at::Tensor& out, const at::Tensor& lse, double scale,
    const Dims& d, at::Tensor dq_seq, bool need_dq, bool need_dpk, bool need_dpv, const at::Tensor& gate,
    const at::Tensor& dgate, const at::Tensor& bias) {
  const at::Tensor qk = aligned16(q), g = aligned16(grad_out), o = aligned16(out);
  const at::Tensor pk = aligned16(prefix_k.contiguous()), pv = aligned16(prefix_v.contiguous());
  const at::Tensor ids = kernel_ids(prefix_ids);
  const at::Tensor lse_f = lse.contiguous();
  const bool accumulate = need_dq && dq_seq.defined();
  const at::Tensor dq = need_dq ? (accumulate ? aligned16(dq_seq) : at::empty_like(qk)) : at::Tensor();
  const int64_t ld = round_up<int64_t>(d.P, 8);
  const int64_t ws_per_sample = (need_dpk + need_dpv) * d.H * d.L * ld * q.element_size();
  const int64_t cap = std::max<int64_t>(int64_t{64} << 20, q.numel() * q.element_size() / 4);
  const int64_t chunk = ws_per_sample > 0 ? std::clamp<int64_t>(cap / ws_per_sample, 1, d.B) : d.B;
  const at::Tensor probs = need_dpv ? at::empty({chunk, d.H, d.L, ld}, q.options()) : at::Tensor();
  const at::Tensor dscores = need_dpk ? at::empty({chunk, d.H, d.L, ld}, q.options()) : at::Tensor();
  std::vector<at::Tensor> dpk_parts, dpv_parts;  // per chunk of samples, [n, Hkv, P, D] float32
  for (int64_t b0 = 0; b0 < d.B; b0 += chunk) {
    const int64_t n = std::min(chunk, d.B - b0);
    Dims dc = d;
    dc.B = n;
    auto part = [&](const at::Tensor& t) { return t.narrow(0, b0, n); };
    const at::Tensor qc = part(qk), gc = part(g);
    kernels::PrefixAttentionBackward a{};
    a.q = rows(qc);
    a.grad_out = rows(gc);
    a.out = rows(part(o));
    a.lse = stats(part(lse_f));
    if (need_dq) a.dq = rows(part(dq));
    a.dq_accumulate = accumulate;
    a.probs = need_dpv ? probs.data_ptr() : nullptr;
    a.dscores = need_dpk ? dscores.data_ptr() : nullptr;
    a.probs_ld = ld;
    a.dgate = dgate.defined() ? part(dgate).data_ptr<float>() : nullptr;
    C10_CUDA_CHECK(kernels::prefix_attention_backward(
        prefix_shape(dc, q, pk, pv, ids.defined() ? part(ids) : ids, scale, gate.defined() ? part(gate) : gate,
                     bias.defined() ? part(bias) : bias),
        a,
        at::cuda::getCurrentCUDAStream()));
    if (need_dpk) dpk_parts.push_back(prefix_grad_per_sample(dscores.narrow(0, 0, n), qc, dc));
    if (need_dpv) dpv_parts.push_back(prefix_grad_per_sample(probs.narrow(0, 0, n), gc, dc));
  }
  auto per_task = [&](const std::vector<at::Tensor>& parts, const at::Tensor& like) {
    if (parts.empty()) return at::Tensor();
    const at::Tensor per_sample = parts.size() == 1 ? parts[0] : at::cat(parts);
    return cpu::sum_per_task(per_sample, prefix_ids, d.tasks).to(like.scalar_type());
  };
  return {dq, per_task(dpk_parts, prefix_k), per_task(dpv_parts, prefix_v)};
}

#endif  // PEFTKERN_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& prefix_k,
                                                            const at::Tensor& prefix_v,
                                                            const std::optional<at::Tensor>& prefix_ids,
                                                            const std::optional<at::Tensor>& attn_mask, bool causal,
                                                            std::optional<double> scale_arg,
                                                            const std::optional<at::Tensor>& prefix_gate,
                                                            const std::optional<at::Tensor>& prefix_bias) {
  const Dims d = check_attention(q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, true);
  check_prefix_gate(kOp, prefix_gate, q, d);
  check_prefix_bias(kOp, prefix_bias, q, d);
  const at::Tensor gate = prefix_gate ? *prefix_gate : at::Tensor();
  const at::Tensor bias = prefix_bias ? *prefix_bias : at::Tensor();
  const double scale = resolve_scale(scale_arg, d);
  at::Tensor lse = lse_like(q, d);
  if (d.B * d.H * d.L == 0) return {out_like(q, d), lse};
#ifdef PEFTKERN_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
#endif
  const SeqKernel kern = sequence_kernel(q, d, attn_mask.has_value());
  const bool fused_seq = kern != SeqKernel::kMath && kern != SeqKernel::kNone;
  const at::Tensor qa = fused_seq ? aligned16(q) : q;
  SeqOut seq;
  SeqMask mask;
  if (kern != SeqKernel::kNone) {
    mask = sequence_mask(kern, q, attn_mask, causal, d);
    seq = sequence_forward(kern, qa, fused_seq ? aligned16(k) : k, fused_seq ? aligned16(v) : v, mask, scale, d);
    mark_rows_without_keys(seq.lse, mask, causal, d);
  }
#ifdef PEFTKERN_WITH_CUDA
  if (prefix_kernel_fits(q, d)) {
    const at::Tensor qk = fused_seq ? qa : aligned16(q);
    if (kern == SeqKernel::kMath) seq.out = seq.out.to(q.scalar_type());  // the kernel reads it in q's dtype
    const at::Tensor pk = aligned16(prefix_k.contiguous()), pv = aligned16(prefix_v.contiguous());
    const at::Tensor ids = kernel_ids(prefix_ids);
    const bool in_place = seq.out.defined() && has_out_layout(seq.out, d);  // merge over the sequence part's out
    const at::Tensor out = in_place ? seq.out : out_like(q, d);
    const at::Tensor seq_out = seq.out.defined() ? aligned16(seq.out) : seq.out;
    kernels::PrefixAttentionForward a{};
    a.q = rows(qk);
    a.out = rows(out);
    a.lse = stats(lse);
    if (seq_out.defined()) {
      a.seq_out = rows(seq_out);
      a.seq_lse = stats(seq.lse);
    }
    const at::Tensor bias4 = bias.defined() ? expanded_prefix_bias(bias, d) : bias;
    C10_CUDA_CHECK(kernels::prefix_attention_forward(prefix_shape(d, q, pk, pv, ids, scale, gate, bias4), a,
                                                     at::cuda::getCurrentCUDAStream()));
    return {out, lse};
  }
#endif
  // composite (CPU; CUDA float32/float64 and head dims the kernels do not cover)
  const PrefixKeys pre = prefix_keys(q, prefix_k, prefix_v, prefix_ids, bias, d);
  auto [out_p, lse_p] = cpu::attend(q, pre.keys, pre.values, pre.bias, false, scale);
  if (gate.defined()) out_p = out_p * gate.to(out_p.scalar_type()).unsqueeze(-1);  // lse stays the joint one
  if (!seq.out.defined()) {  // S == 0: only the prefix part (rows without prefix keys: lse +inf)
    seq.out = at::zeros({}, out_p.options()).expand(out_p.sizes());
    seq.lse = at::full({}, -kInf, lse_p.options()).expand(lse_p.sizes());
  }
  auto [out_m, lse_m] = cpu::merge_parts(seq.out, seq.lse, out_p, lse_p);
  at::Tensor out = out_like(q, d);
  out.copy_(out_m);
  lse.copy_(lse_m);
  return {out, lse};
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

Grads prefix_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                const std::optional<at::Tensor>& prefix_ids, const std::optional<at::Tensor>& attn_mask,
                                const at::Tensor& out, const at::Tensor& lse, bool causal,
                                std::optional<double> scale_arg, std::array<bool, 5> need,
                                const std::optional<at::Tensor>& prefix_gate, bool gate_grad,
                                const std::optional<at::Tensor>& prefix_bias) {
  const Dims d = check_attention(q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, false);
  check_prefix_gate("prefix_attention_backward", prefix_gate, q, d);
  check_prefix_bias("prefix_attention_backward", prefix_bias, q, d);
  const at::Tensor bias = prefix_bias ? *prefix_bias : at::Tensor();
  TORCH_CHECK_VALUE(!gate_grad || prefix_gate, "prefix_attention_backward: gate_grad needs the forward's prefix_gate");
  const at::Tensor gate = prefix_gate ? *prefix_gate : at::Tensor();
  const double scale = resolve_scale(scale_arg, d);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "prefix_attention_backward: grad_out and out must have q's shape ", q.sizes(), "; got ",
                    grad_out.sizes(), " and ", out.sizes());
  check_like(grad_out, "prefix_attention_backward", "grad_out", q, "q");
  check_like(out, "prefix_attention_backward", "out", q, "q");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({d.B, d.H, d.L}) && lse.scalar_type() == lse_dtype(q),
                    "prefix_attention_backward: lse must be the forward's [B, H, L] log-sum-exp");
  const auto [need_dq, need_dk, need_dv, need_dpk, need_dpv] = need;
  at::Tensor dq, dk, dv, dpk, dpv, dgate;
  const bool rows_exist = d.B * d.H * d.L > 0;
#ifdef PEFTKERN_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
#endif
  const SeqKernel kern = rows_exist ? sequence_kernel(q, d, attn_mask.has_value()) : SeqKernel::kNone;
  const bool fused_seq = kern != SeqKernel::kMath && kern != SeqKernel::kNone;
  auto prep = [&](const at::Tensor& t) { return fused_seq ? aligned16(t) : t; };
  if (kern != SeqKernel::kNone && (need_dq || need_dk || need_dv)) {
    const SeqMask mask = sequence_mask(kern, q, attn_mask, causal, d);
    std::tie(dq, dk, dv) = sequence_backward(kern, prep(grad_out), prep(q), prep(k), prep(v), prep(out), lse, mask,
                                             scale, d, {need_dq, need_dk, need_dv});
  }
  const bool prefix_grads = rows_exist && d.P > 0 && (need_dq || need_dpk || need_dpv || gate_grad);
  bool prefix_done = !prefix_grads;
#ifdef PEFTKERN_WITH_CUDA
  if (prefix_grads && prefix_kernel_fits(q, d)) {
    const at::Tensor dgate_f = gate_grad ? at::empty({d.B, d.H, d.L}, q.options().dtype(at::kFloat)) : at::Tensor();
    std::tie(dq, dpk, dpv) = prefix_backward_on_kernels(grad_out, q, prefix_k, prefix_v, prefix_ids, out, lse, scale, d,
                                                        dq, need_dq, need_dpk, need_dpv, gate, dgate_f,
                                                        bias.defined() ? expanded_prefix_bias(bias, d) : bias);
    if (gate_grad) dgate = dgate_f.to(q.scalar_type());
    prefix_done = true;
  }
#endif
  if (!prefix_done) {  // composite
    const auto mt = cpu::attention_math_dtype(q.scalar_type());
    const at::Tensor delta = (grad_out.to(mt) * out.to(mt)).sum(-1);
    const PrefixKeys pre = prefix_keys(q, prefix_k, prefix_v, prefix_ids, bias, d);
    at::Tensor dgate_m;
    auto [dq_p, dpk_s, dpv_s] = cpu::attend_backward(grad_out, q, pre.keys, pre.values, pre.bias, false, scale, lse,
                                                     delta, need_dq, need_dpk, need_dpv, gate,
                                                     gate_grad ? &dgate_m : nullptr);
    if (gate_grad) dgate = dgate_m.to(q.scalar_type());
    if (need_dq) dq = (dq.defined() ? dq.to(mt) + dq_p : dq_p).to(q.scalar_type());
    if (need_dpk) dpk = cpu::sum_per_task(dpk_s, prefix_ids, d.tasks).to(prefix_k.scalar_type());
    if (need_dpv) dpv = cpu::sum_per_task(dpv_s, prefix_ids, d.tasks).to(prefix_v.scalar_type());
  }
  // Each gradient in its input's layout (empty_like's; what the fake implementation promises); parts
  // that do not exist (S = 0, P = 0, no rows) contribute zeros.
  auto finish = [](bool needed, const at::Tensor& g, const at::Tensor& input) -> std::optional<at::Tensor> {
    if (!needed) return std::nullopt;
    if (!g.defined()) return at::zeros_like(input);
    if (g.strides() == at::empty_like(input, input.options().device(at::kMeta)).strides()) return g;
    return at::empty_like(input).copy_(g);
  };
  std::optional<at::Tensor> dgate_out;
  if (gate_grad) dgate_out = dgate.defined() ? dgate : at::zeros({d.B, d.H, d.L}, q.options());
  return {finish(need_dq, dq, q),
          finish(need_dk, dk, k),
          finish(need_dv, dv, v),
          finish(need_dpk, dpk, prefix_k),
          finish(need_dpv, dpv, prefix_v),
          dgate_out};
}

void register_impls(torch::Library& m) {
  m.impl("prefix_attention_forward", fresh_outputs<&prefix_attention_forward>);
  m.impl("prefix_attention_backward", fresh_outputs<&prefix_attention_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
