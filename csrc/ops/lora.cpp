// peftkern::lora_linear_forward / lora_linear_backward / dropout_mask: checks, then the CPU path,
// or on CUDA the base product through cuBLAS and the low-rank update through the fused kernels of
// csrc/kernels/lowrank.h (dropout generated in-kernel, update added in place into the output).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/dropout.h"
#include "cpu/lowrank.h"
#include "ops/common.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/lowrank.h"
#include "ops/cuda_random.h"
#endif

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "lora_linear";

struct Dims {
  int64_t rows, n_in, n_out, r;
};

Dims check_lora(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& lora_A, const at::Tensor& lora_B, double dropout_p) {
  check_floating(x, kOp, "x");
  check_like(weight, kOp, "weight", x, "x");
  check_like(bias, kOp, "bias", x, "x");
  check_like(lora_A, kOp, "lora_A", x, "x");
  check_like(lora_B, kOp, "lora_B", x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, kOp, ": x must have shape [..., in_features] with in_features >= 1; got ",
                    x.sizes());
  const int64_t n_in = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == n_in && weight.size(0) >= 1, kOp,
                    ": weight must have shape [out_features, in_features] with in_features = ", n_in,
                    " (x's last dimension); got ", weight.sizes());
  const int64_t n_out = weight.size(0);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n_out), kOp, ": bias must have shape [out_features] = [",
                    n_out, "]; got ", bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == n_in && lora_A.size(0) >= 1, kOp,
                    ": lora_A must have shape [r, in_features] with r >= 1 and in_features = ", n_in, "; got ",
                    lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == n_out && lora_B.size(1) == r, kOp,
                    ": lora_B must have shape [out_features, r] = [", n_out, ", ", r,
                    "] (out_features from weight, r from lora_A); got ", lora_B.sizes());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK_VALUE(n_in <= INT32_MAX && n_out <= INT32_MAX, kOp, ": in/out features must fit in 32 bits");
  const int64_t rows = x.numel() / n_in;
  TORCH_CHECK_VALUE(dropout_p == 0.0 || rows < (int64_t(1) << 32), kOp, ": dropout supports fewer than 2^32 rows");
  return {rows, n_in, n_out, r};
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>, std::optional<at::Tensor>>;

// x dropped by the factors in mask (undefined: no dropout), rounded back to x's dtype as eager
// dropout's output is.
at::Tensor dropped(const at::Tensor& x2, const at::Tensor& mask) {
  return mask.defined() ? (x2 * mask).to(x2.scalar_type()) : x2;
}

// The low-rank update by ATen ops, on top of `base` (2-D): the CPU path and the CUDA slow path.
std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& x2, const at::Tensor& base, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, const at::Tensor& mask,
                                                     bool save) {
  return cpu::lowrank_forward(dropped(x2, mask), lora_A, std::nullopt, lora_B, std::nullopt, base, Activation::kIdentity,
                              scaling, save);
}

// Gradients of the low-rank update: (dx term, d lora_A, d lora_B), undefined where not asked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_backward(const at::Tensor& g2, const at::Tensor& x2,
                                                                  const at::Tensor& u2, const at::Tensor& lora_A,
                                                                  const at::Tensor& lora_B, double scaling,
                                                                  const at::Tensor& mask, bool need_dx, bool need_dA,
                                                                  bool need_dB) {
  auto [dxd, dA, unused_dbd, dB, unused_dbu] = cpu::lowrank_backward(
      g2, dropped(x2, mask), u2, lora_A, lora_B, Activation::kIdentity, scaling, false,
      {need_dx, need_dA, false, need_dB, false});
  if (dxd.defined() && mask.defined()) dxd = dxd * mask;  // d dropout(x) / dx
  return {dxd, dA, dB};
}

Forward finish_forward(const at::Tensor& x, const Dims& dims, const at::Tensor& out, const at::Tensor& u, bool save,
                       const at::Tensor& seed_offset) {
  return {out.view(with_last(x.sizes(), dims.n_out)), save ? u.view(with_last(x.sizes(), dims.r)) : u, seed_offset};
}

Grads finish_backward(const at::Tensor& x, const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db,
                      const at::Tensor& dA, const at::Tensor& dB) {
  return {dx.defined() ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt, defined_or_none(dw),
          defined_or_none(db), defined_or_none(dA), defined_or_none(dB)};
}

// ------------------------------------------------------------------ CPU

Forward lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                         bool training, bool save) {
  const Dims dims = check_lora(x, weight, bias, lora_A, lora_B, dropout_p);
  const double p = training ? dropout_p : 0.0;
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor seed_offset = at::empty({0}, x.options().dtype(at::kLong));
  at::Tensor mask;
  if (p > 0) {
    const auto [seed, offset] = cpu::next_seed_offset();
    seed_offset = at::tensor({static_cast<int64_t>(seed), static_cast<int64_t>(offset)}, at::kLong);
    mask = cpu::dropout_mask(dims.rows, dims.n_in, seed, offset, p);
  }
  auto [out, u] = composite_forward(x2, base_product(x2, weight, bias), lora_A, lora_B, scaling, mask, save);
  return finish_forward(x, dims, out, u, save, seed_offset);
}

Grads lora_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, const at::Tensor& u, const at::Tensor& seed_offset, double scaling,
                        double dropout_p, std::array<bool, 5> need) {
  const Dims dims = check_lora(x, weight, std::nullopt, lora_A, lora_B, dropout_p);
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out});
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor mask;
  if (dropout_p > 0) {
    const int64_t* so = seed_offset.data_ptr<int64_t>();
    mask = cpu::dropout_mask(dims.rows, dims.n_in, static_cast<uint64_t>(so[0]), static_cast<uint64_t>(so[1]), dropout_p);
  }
  auto [dx_low, dA, dB] = composite_backward(g2, x2, u.reshape({dims.rows, dims.r}), lora_A, lora_B, scaling, mask,
                                             need_dx, need_dA, need_dB);
  at::Tensor dx, dw, db;
  if (need_dx) dx = (at::mm(g2, weight) + dx_low).to(x.scalar_type());
  if (need_dw) dw = at::mm(g2.t(), x2);
  if (need_db) db = g2.sum(0);
  return finish_backward(x, dx, dw, db, dA, dB);
}

at::Tensor dropout_mask_cpu(const at::Tensor& x, const at::Tensor& seed_offset, double p) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "dropout_mask: x must have at least 1 dimension");
  TORCH_CHECK_VALUE(seed_offset.numel() == 2 && seed_offset.scalar_type() == at::kLong, "dropout_mask: seed_offset must be int64 [2]");
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const int64_t* so = seed_offset.data_ptr<int64_t>();
  return cpu::dropout_mask(rows, cols, static_cast<uint64_t>(so[0]), static_cast<uint64_t>(so[1]), p).view(x.sizes());
}

// ------------------------------------------------------------------ CUDA

#ifdef PEFTKERN_WITH_CUDA

// PEFTKERN_LORA_UPDATE=addmm computes the update of a dropout-free forward as u = x @ A^T,
// out.addmm_(u, B^T) (cuBLAS) instead of the fused kernel, for benchmarking the two.
bool use_addmm_update() {
  const char* v = std::getenv("PEFTKERN_LORA_UPDATE");
  return v && std::strcmp(v, "addmm") == 0;
}

bool fused(const at::Tensor& x, int64_t r) { return x.scalar_type() != at::kDouble && r <= kernels::kLowRankMaxFusedRank; }

Forward lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                          bool training, bool save) {
  const Dims dims = check_lora(x, weight, bias, lora_A, lora_B, dropout_p);
  const double p = training ? dropout_p : 0.0;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  at::Tensor out = base_product(x2, weight, bias);
  at::Tensor seed_offset = at::empty({p > 0 ? 2 : 0}, x.options().dtype(at::kLong));
  kernels::DropoutArgs drop;
  if (p > 0) {
    drop.p = static_cast<float>(p);
    drop.philox = next_cuda_philox(x.device());
    drop.seed_offset_out = seed_offset.data_ptr<int64_t>();
  }

  if (!fused(x, dims.r) || (p == 0 && use_addmm_update())) {
    at::Tensor mask;
    if (p > 0) {
      mask = at::empty({dims.rows, dims.n_in}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(kernels::dropout_mask(dims.rows, dims.n_in, drop, mask.data_ptr<float>(), stream));
    }
    at::Tensor u;
    if (fused(x, dims.r)) {  // the addmm_ update (p == 0)
      u = at::mm(x2, lora_A.t());
      out.addmm_(u, lora_B.t(), 1.0, scaling);
    } else {
      std::tie(out, u) = composite_forward(x2, out, lora_A, lora_B, scaling, mask, true);
    }
    return finish_forward(x, dims, out, save ? u : at::empty({0}, x.options()), save, seed_offset);
  }

  const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
  at::Tensor u = save ? at::empty({dims.rows, dims.r}, x.options()) : at::empty({0}, x.options());
  kernels::LowRankForwardArgs args{};
  args.dtype = kernel_dtype(x.scalar_type());
  args.activation = Activation::kIdentity;
  args.scale = static_cast<float>(scaling);
  args.rows = dims.rows;
  args.n_in = static_cast<int>(dims.n_in);
  args.n_out = static_cast<int>(dims.n_out);
  args.r = static_cast<int>(dims.r);
  args.x = x2.data_ptr();
  args.w_down = a.data_ptr();
  args.w_up = b.data_ptr();
  args.res = args.y = out.data_ptr();  // the update is added in place into the base product
  args.z = save ? u.data_ptr() : nullptr;
  args.dropout = drop;
  C10_CUDA_CHECK(kernels::lowrank_forward(args, stream));
  return finish_forward(x, dims, out, u, save, seed_offset);
}

Grads lora_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u,
                         const at::Tensor& seed_offset, double scaling, double dropout_p, std::array<bool, 5> need) {
  const Dims dims = check_lora(x, weight, std::nullopt, lora_A, lora_B, dropout_p);
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out}).contiguous();
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  const at::Tensor u2 = u.reshape({dims.rows, dims.r}).contiguous();
  at::Tensor dx = need_dx ? at::mm(g2, weight) : at::Tensor();  // base term through cuBLAS
  at::Tensor dw = need_dw ? at::mm(g2.t(), x2) : at::Tensor();
  at::Tensor db = need_db ? g2.sum(0) : at::Tensor();
  at::Tensor dA, dB;
  if (!(need_dx || need_dA || need_dB)) return finish_backward(x, dx, dw, db, dA, dB);

  if (!fused(x, dims.r)) {
    at::Tensor mask;
    if (dropout_p > 0) {
      kernels::DropoutArgs drop;
      drop.p = static_cast<float>(dropout_p);
      drop.seed_offset = seed_offset.data_ptr<int64_t>();
      mask = at::empty({dims.rows, dims.n_in}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(kernels::dropout_mask(dims.rows, dims.n_in, drop, mask.data_ptr<float>(), stream));
    }
    at::Tensor dx_low;
    std::tie(dx_low, dA, dB) = composite_backward(g2, x2, u2, lora_A, lora_B, scaling, mask, need_dx, need_dA, need_dB);
    if (need_dx) dx.add_(dx_low);
    return finish_backward(x, dx, dw, db, dA, dB);
  }

  const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
  if (need_dA) dA = at::empty({dims.r, dims.n_in}, x.options());
  if (need_dB) dB = at::empty({dims.n_out, dims.r}, x.options());
  kernels::LowRankBackwardArgs args{};
  args.dtype = kernel_dtype(x.scalar_type());
  args.activation = Activation::kIdentity;
  args.scale = static_cast<float>(scaling);
  args.rows = dims.rows;
  args.n_in = static_cast<int>(dims.n_in);
  args.n_out = static_cast<int>(dims.n_out);
  args.r = static_cast<int>(dims.r);
  args.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  args.grad_out = g2.data_ptr();
  args.x = x2.data_ptr();
  args.z = u2.data_ptr();
  args.w_down = a.data_ptr();
  args.w_up = b.data_ptr();
  args.dx_mode = kernels::DxMode::kAccumulate;
  args.dx = need_dx ? dx.data_ptr() : nullptr;
  args.dw_down = need_dA ? dA.data_ptr() : nullptr;
  args.dw_up = need_dB ? dB.data_ptr() : nullptr;
  if (dropout_p > 0) {
    args.dropout.p = static_cast<float>(dropout_p);
    args.dropout.seed_offset = seed_offset.data_ptr<int64_t>();
  }
  args.workspace_bytes = kernels::lowrank_backward_workspace_bytes(args);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(args.workspace_bytes)}, x.options().dtype(at::kByte));
  args.workspace = args.workspace_bytes ? workspace.data_ptr() : nullptr;
  C10_CUDA_CHECK(kernels::lowrank_backward(args, stream));
  return finish_backward(x, dx, dw, db, dA, dB);
}

at::Tensor dropout_mask_cuda(const at::Tensor& x, const at::Tensor& seed_offset, double p) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "dropout_mask: x must have at least 1 dimension");
  TORCH_CHECK_VALUE(seed_offset.numel() == 2 && seed_offset.scalar_type() == at::kLong && seed_offset.device() == x.device(),
                    "dropout_mask: seed_offset must be int64 [2] on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  kernels::DropoutArgs drop;
  drop.p = static_cast<float>(p);
  drop.seed_offset = seed_offset.data_ptr<int64_t>();
  C10_CUDA_CHECK(kernels::dropout_mask(rows, cols, drop, out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return out;
}

#endif  // PEFTKERN_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_linear_forward", &lora_forward_cpu);
  m.impl("lora_linear_backward", &lora_backward_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_linear_forward", &lora_forward_cuda);
  m.impl("lora_linear_backward", &lora_backward_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}
#endif

}  // namespace peftkern::ops

// ====================================================================== multi-adapter batches
// out[t] = base(x[t]) + scalings[i] * (x[t] @ lora_A[i]^T) @ lora_B[i]^T with i = adapter_ids[t]
// (i = -1: base only). CUDA forward: tokens grouped by adapter on the device, then the fused
// low-rank kernel with one adapter per 64-token block. CPU, the backward, and CUDA float64 or
// r > 256: a per-adapter composite (it reads the per-adapter token counts on the host).

namespace peftkern::ops {
namespace {

constexpr const char* kMultiOp = "lora_linear_multi";

struct MultiDims {
  int64_t rows, n_in, n_out, r, adapters;
};

MultiDims check_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                      const at::Tensor& scalings, bool check_id_values) {
  check_floating(x, kMultiOp, "x");
  check_like(weight, kMultiOp, "weight", x, "x");
  check_like(bias, kMultiOp, "bias", x, "x");
  check_like(lora_A, kMultiOp, "lora_A", x, "x");
  check_like(lora_B, kMultiOp, "lora_B", x, "x");
  TORCH_CHECK_TYPE(at::isFloatingType(scalings.scalar_type()), kMultiOp, ": scalings must be a floating-point tensor; got ",
                   scalings.scalar_type());
  TORCH_CHECK_VALUE(scalings.device() == x.device(), kMultiOp, ": scalings is on ", scalings.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, kMultiOp, ": x must have shape [..., in_features]; got ", x.sizes());
  const int64_t n_in = x.size(-1), rows = x.numel() / n_in;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == n_in && weight.size(0) >= 1, kMultiOp,
                    ": weight must have shape [out_features, in_features] with in_features = ", n_in, "; got ",
                    weight.sizes());
  const int64_t n_out = weight.size(0);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n_out), kMultiOp,
                    ": bias must have shape [out_features] = [", n_out, "]; got ", bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 && lora_A.size(2) == n_in, kMultiOp,
                    ": lora_A must have shape [L, r, in_features] with in_features = ", n_in, "; got ", lora_A.sizes());
  const int64_t L = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == L && lora_B.size(1) == n_out && lora_B.size(2) == r, kMultiOp,
                    ": lora_B must have shape [L, out_features, r] = [", L, ", ", n_out, ", ", r, "]; got ", lora_B.sizes());
  TORCH_CHECK_VALUE(scalings.dim() == 1 && scalings.size(0) == L, kMultiOp, ": scalings must have shape [L] = [", L,
                    "]; got ", scalings.sizes());
  // In capture, ids >= L act as -1; the backward skips the host read its forward already did.
  check_ids(kMultiOp, "adapter_ids", ids, rows, "tokens", x, "x", -1, L, "[-1, L)", check_id_values);
  return {rows, n_in, n_out, r, L};
}

// Tokens grouped by adapter: key = id (L for -1 and out-of-range ids), order = stable argsort.
std::pair<at::Tensor, at::Tensor> group_by_adapter(const at::Tensor& ids, int64_t L) {
  const at::Tensor id64 = ids.to(at::kLong);
  const at::Tensor key = at::where((id64 < 0).logical_or(id64 >= L), at::scalar_tensor(L, id64.options()), id64);
  const at::Tensor order = at::argsort(key, /*stable=*/true);
  const at::Tensor counts = at::zeros({L + 1}, id64.options()).scatter_add_(0, key, at::ones_like(key));
  return {order, counts};
}

at::Tensor multi_composite_forward(const at::Tensor& x2, at::Tensor out, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   const at::Tensor& ids, const at::Tensor& scalings) {
  const int64_t L = lora_A.size(0);
  const auto mt = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto [order, counts] = group_by_adapter(ids, L);
  const at::Tensor n = counts.cpu();
  const at::Tensor s = scalings.to(mt);
  int64_t start = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t count = n[l].item<int64_t>();
    if (count == 0) continue;
    const at::Tensor idx = order.narrow(0, start, count);
    start += count;
    const at::Tensor u = x2.index_select(0, idx).to(mt).mm(lora_A[l].to(mt).t());
    out.index_add_(0, idx, (u.mm(lora_B[l].to(mt).t()) * s[l]).to(out.scalar_type()));
  }
  return out;
}

at::Tensor lora_multi_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                              const at::Tensor& scalings) {
  const MultiDims dims = check_multi(x, weight, bias, lora_A, lora_B, ids, scalings, true);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  at::Tensor out = base_product(x2, weight, bias);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda() && fused(x, dims.r) && dims.rows > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t L = dims.adapters;
    const auto [order, counts] = group_by_adapter(ids, L);
    const at::Tensor zero = at::zeros({1}, counts.options());
    const at::Tensor seg_start = at::cat({zero, counts.cumsum(0)}).narrow(0, 0, L + 1).contiguous();
    const at::Tensor blocks = (counts.narrow(0, 0, L) + (kernels::kLowRankRowsPerBlock - 1))
                                  .div(kernels::kLowRankRowsPerBlock, "floor");
    const at::Tensor block_start = at::cat({zero, blocks.cumsum(0)}).contiguous();
    const at::Tensor scales = scalings.to(at::kFloat).contiguous();
    const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
    kernels::LowRankForwardArgs args{};
    args.dtype = kernel_dtype(x.scalar_type());
    args.activation = Activation::kIdentity;
    args.scale = 1.f;
    args.rows = dims.rows;
    args.n_in = static_cast<int>(dims.n_in);
    args.n_out = static_cast<int>(dims.n_out);
    args.r = static_cast<int>(dims.r);
    args.x = x2.data_ptr();
    args.w_down = a.data_ptr();
    args.w_up = b.data_ptr();
    args.res = args.y = out.data_ptr();
    args.segments.num_adapters = static_cast<int>(L);
    args.segments.order = order.data_ptr<int64_t>();
    args.segments.seg_start = seg_start.data_ptr<int64_t>();
    args.segments.block_start = block_start.data_ptr<int64_t>();
    args.segments.w_down_stride = dims.r * dims.n_in;
    args.segments.w_up_stride = dims.n_out * dims.r;
    args.segments.scales = scales.data_ptr<float>();
    C10_CUDA_CHECK(kernels::lowrank_forward(args, at::cuda::getCurrentCUDAStream()));
    return out.view(with_last(x.sizes(), dims.n_out));
  }
#endif
  return multi_composite_forward(x2, out, lora_A, lora_B, ids, scalings).view(with_last(x.sizes(), dims.n_out));
}

Grads lora_multi_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                          const at::Tensor& scalings, std::array<bool, 5> need) {
  const MultiDims dims = check_multi(x, weight, std::nullopt, lora_A, lora_B, ids, scalings, false);
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const auto dt = x.scalar_type();
  const auto mt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out}).to(mt);
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor dx = need_dx ? g2.mm(weight.to(mt)) : at::Tensor();
  at::Tensor dw = need_dw ? g2.t().mm(x2.to(mt)).to(dt) : at::Tensor();
  at::Tensor db = need_db ? g2.sum(0).to(dt) : at::Tensor();
  at::Tensor dA = need_dA ? at::zeros(lora_A.sizes(), lora_A.options().dtype(mt)) : at::Tensor();
  at::Tensor dB = need_dB ? at::zeros(lora_B.sizes(), lora_B.options().dtype(mt)) : at::Tensor();
  if (need_dx || need_dA || need_dB) {
    const auto [order, counts] = group_by_adapter(ids, dims.adapters);
    const at::Tensor n = counts.cpu();
    const at::Tensor s = scalings.to(mt);
    int64_t start = 0;
    for (int64_t l = 0; l < dims.adapters; ++l) {
      const int64_t count = n[l].item<int64_t>();
      if (count == 0) continue;
      const at::Tensor idx = order.narrow(0, start, count);
      start += count;
      const at::Tensor xl = x2.index_select(0, idx).to(mt), gl = g2.index_select(0, idx);
      const at::Tensor a = lora_A[l].to(mt), b = lora_B[l].to(mt);
      const at::Tensor v = gl.mm(b) * s[l];  // scaling * grad_out @ lora_B   [count, r]
      if (need_dx) dx.index_add_(0, idx, v.mm(a));
      if (need_dA) dA[l].copy_(v.t().mm(xl));
      if (need_dB) dB[l].copy_(gl.t().mm(xl.mm(a.t())) * s[l]);
    }
  }
  auto cast = [dt](const at::Tensor& t) { return t.defined() ? t.to(dt) : t; };
  return finish_backward(x, cast(dx), dw, db, cast(dA), cast(dB));
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_linear_multi_forward", &lora_multi_forward);
  m.impl("lora_linear_multi_backward", &lora_multi_backward);
}

#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_linear_multi_forward", &lora_multi_forward);
  m.impl("lora_linear_multi_backward", &lora_multi_backward);
}
#endif

}  // namespace peftkern::ops
