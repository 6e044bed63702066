// peftkern::lora_linear_forward / lora_linear_backward: checks, then the base product (cuBLAS on
// CUDA) and the low-rank update: the fused kernels of kernels/lowrank.h where they apply (dropout
// generated in-kernel, the update added in place into the output), else the composite of
// cpu/lowrank.h with the dropout mask of cpu/dropout.h or kernels/dropout.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/dropout.h"
#include "cpu/lowrank.h"
#include "ops/common.h"
#include "ops/lowrank.h"

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/dropout.h"
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
  const auto [rows, n_in, n_out] = check_linear(kOp, x, weight, bias);
  check_like(lora_A, kOp, "lora_A", x, "x");
  check_like(lora_B, kOp, "lora_B", x, "x");
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == n_in && lora_A.size(0) >= 1, kOp,
                    ": lora_A must have shape [r, in_features] with r >= 1 and in_features = ", n_in, "; got ",
                    lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == n_out && lora_B.size(1) == r, kOp,
                    ": lora_B must have shape [out_features, r] = [", n_out, ", ", r,
                    "] (out_features from weight, r from lora_A); got ", lora_B.sizes());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK_VALUE(n_in <= INT32_MAX && n_out <= INT32_MAX, kOp, ": in/out features must fit in 32 bits");
  TORCH_CHECK_VALUE(dropout_p == 0.0 || rows < (int64_t(1) << 32), kOp, ": dropout supports fewer than 2^32 rows");
  return {rows, n_in, n_out, r};
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// x dropped by the factors in mask (undefined: no dropout), rounded back to x's dtype as eager
// dropout's output is.
at::Tensor dropped(const at::Tensor& x2, const at::Tensor& mask) {
  return mask.defined() ? (x2 * mask).to(x2.scalar_type()) : x2;
}

// The low-rank update by ATen ops, on top of `base` (2-D): the CPU path and the CUDA slow path.
std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& x2, const at::Tensor& base,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                                     const at::Tensor& mask, bool save,
                                                     const std::optional<at::Tensor>& gate) {
  return cpu::lowrank_forward(dropped(x2, mask), lora_A, std::nullopt, lora_B, std::nullopt, base,
                              Activation::kIdentity, scaling, save, gate);
}

// Gradients of the low-rank update: (dx term, d lora_A, d lora_B, d gate), undefined where not asked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_backward(
    const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& u2, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, const at::Tensor& mask, bool need_dx, bool need_dA, bool need_dB,
    const std::optional<at::Tensor>& gate, bool need_dgate) {
  at::Tensor dgate;
  auto [dxd, dA, unused_dbd, dB, unused_dbu] =
      cpu::lowrank_backward(g2, dropped(x2, mask), u2, lora_A, lora_B, Activation::kIdentity, scaling, false,
                            {need_dx, need_dA, false, need_dB, false}, gate, std::nullopt,
                            need_dgate ? &dgate : nullptr);
  if (dxd.defined() && mask.defined()) dxd = dxd * mask;  // d dropout(x) / dx
  return {dxd, dA, dB, dgate};
}

Forward finish_forward(const at::Tensor& x, const Dims& dims, const at::Tensor& out, const at::Tensor& u, bool save,
                       const at::Tensor& seed_offset) {
  return {out.view(with_last(x.sizes(), dims.n_out)), save ? u.view(with_last(x.sizes(), dims.r)) : u, seed_offset};
}

Grads6 finish_backward(const at::Tensor& x, const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db,
                       const at::Tensor& dA, const at::Tensor& dB, const at::Tensor& dgate = at::Tensor()) {
  return {dx.defined() ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt,
          defined_or_none(dw),
          defined_or_none(db),
          defined_or_none(dA),
          defined_or_none(dB),
          dgate.defined() ? std::optional<at::Tensor>(
                                dgate.to(x.scalar_type()).view(x.sizes().slice(0, x.dim() - 1)))
                          : std::nullopt};
}

// ------------------------------------------------------------------ CUDA

#ifdef PEFTKERN_WITH_CUDA

// PEFTKERN_LORA_UPDATE=addmm computes the update of a dropout-free forward as u = x @ A^T,
// out.addmm_(u, B^T) (cuBLAS) instead of the fused kernel, for benchmarking the two.
bool use_addmm_update() {
  const char* v = std::getenv("PEFTKERN_LORA_UPDATE");
  return v && std::strcmp(v, "addmm") == 0;
}

// p: the dropout probability applied (0 in eval).
Forward forward_cuda(const at::Tensor& x, const Dims& dims, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     double scaling, double p, bool save, const std::optional<at::Tensor>& gate) {
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

  if (!lowrank_fused(x, dims.r) || (p == 0 && use_addmm_update())) {
    at::Tensor mask;
    if (p > 0) {
      mask = at::empty({dims.rows, dims.n_in}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(kernels::dropout_mask(dims.rows, dims.n_in, drop, mask.data_ptr<float>(), stream));
    }
    at::Tensor u;
    if (lowrank_fused(x, dims.r)) {  // the addmm_ update (p == 0)
      u = at::mm(x2, lora_A.t());
      out.addmm_(gate ? u * gate->reshape({-1, 1}) : u, lora_B.t(), 1.0, scaling);
    } else {
      std::tie(out, u) = composite_forward(x2, out, lora_A, lora_B, scaling, mask, true, gate);
    }
    return finish_forward(x, dims, out, save ? u : at::empty({0}, x.options()), save, seed_offset);
  }

  const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
  at::Tensor u = save ? at::empty({dims.rows, dims.r}, x.options()) : at::empty({0}, x.options());
  auto args = lowrank_args<kernels::LowRankForwardArgs>(x, Activation::kIdentity, scaling, dims.rows, dims.n_in,
                                                        dims.n_out, dims.r);
  args.x = x2.data_ptr();
  args.w_down = a.data_ptr();
  args.w_up = b.data_ptr();
  args.res = args.y = out.data_ptr();  // the update is added in place into the base product
  args.z = save ? u.data_ptr() : nullptr;
  args.gate = data_or_null(gate);
  args.dropout = drop;
  C10_CUDA_CHECK(kernels::lowrank_forward(args, stream));
  return finish_forward(x, dims, out, u, save, seed_offset);
}

Grads6 backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const Dims& dims, const at::Tensor& weight,
                     const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u,
                     const at::Tensor& seed_offset, double scaling, double dropout_p, std::array<bool, 5> need,
                     const std::optional<at::Tensor>& gate, bool need_dgate) {
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out}).contiguous();
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in}).contiguous();
  const at::Tensor u2 = u.reshape({dims.rows, dims.r}).contiguous();
  at::Tensor dx = need_dx ? at::mm(g2, weight) : at::Tensor();  // base term through cuBLAS
  at::Tensor dw = need_dw ? at::mm(g2.t(), x2) : at::Tensor();
  at::Tensor db = need_db ? g2.sum(0) : at::Tensor();
  at::Tensor dA, dB, dgate;
  if (!(need_dx || need_dA || need_dB || need_dgate)) return finish_backward(x, dx, dw, db, dA, dB);

  if (!lowrank_fused(x, dims.r)) {
    at::Tensor mask;
    if (dropout_p > 0) {
      kernels::DropoutArgs drop;
      drop.p = static_cast<float>(dropout_p);
      drop.seed_offset = seed_offset.data_ptr<int64_t>();
      mask = at::empty({dims.rows, dims.n_in}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(kernels::dropout_mask(dims.rows, dims.n_in, drop, mask.data_ptr<float>(), stream));
    }
    at::Tensor dx_low;
    std::tie(dx_low, dA, dB, dgate) = composite_backward(g2, x2, u2, lora_A, lora_B, scaling, mask, need_dx, need_dA,
                                                         need_dB, gate, need_dgate);
    if (need_dx) dx.add_(dx_low);
    return finish_backward(x, dx, dw, db, dA, dB, dgate);
  }

  const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
  if (need_dA) dA = at::empty({dims.r, dims.n_in}, x.options());
  if (need_dB) dB = at::empty({dims.n_out, dims.r}, x.options());
  if (need_dgate) dgate = at::empty({dims.rows}, x.options().dtype(at::kFloat));
  auto args = lowrank_args<kernels::LowRankBackwardArgs>(x, Activation::kIdentity, scaling, dims.rows, dims.n_in,
                                                         dims.n_out, dims.r);
  args.grad_out = g2.data_ptr();
  args.x = x2.data_ptr();
  args.z = u2.data_ptr();
  args.w_down = a.data_ptr();
  args.w_up = b.data_ptr();
  args.dx_mode = kernels::DxMode::kAccumulate;
  args.dx = need_dx ? dx.data_ptr() : nullptr;
  args.dw_down = need_dA ? dA.data_ptr() : nullptr;
  args.dw_up = need_dB ? dB.data_ptr() : nullptr;
  args.gate = data_or_null(gate);
  args.dgate = need_dgate ? dgate.data_ptr<float>() : nullptr;
  if (dropout_p > 0) {
    args.dropout.p = static_cast<float>(dropout_p);
    args.dropout.seed_offset = seed_offset.data_ptr<int64_t>();
  }
  args.workspace_bytes = kernels::lowrank_backward_workspace_bytes(args);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(args.workspace_bytes)}, x.options().dtype(at::kByte));
  args.workspace = args.workspace_bytes ? workspace.data_ptr() : nullptr;
  C10_CUDA_CHECK(kernels::lowrank_backward(args, stream));
  return finish_backward(x, dx, dw, db, dA, dB, dgate);
}

#endif  // PEFTKERN_WITH_CUDA

// ------------------------------------------------------------------ the ops (CPU: ATen composite)

Forward lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                            bool training, bool save, const std::optional<at::Tensor>& gate) {
  const Dims dims = check_lora(x, weight, bias, lora_A, lora_B, dropout_p);
  const double p = training ? dropout_p : 0.0;
  const auto g = check_gate(kOp, gate, x);
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda()) return forward_cuda(x, dims, weight, bias, lora_A, lora_B, scaling, p, save, g);
#endif
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor seed_offset = at::empty({0}, x.options().dtype(at::kLong));
  at::Tensor mask;
  if (p > 0) {
    const auto [seed, offset] = cpu::next_seed_offset();
    seed_offset = at::tensor({static_cast<int64_t>(seed), static_cast<int64_t>(offset)}, at::kLong);
    mask = cpu::dropout_mask(dims.rows, dims.n_in, seed, offset, p);
  }
  auto [out, u] = composite_forward(x2, base_product(x2, weight, bias), lora_A, lora_B, scaling, mask, save, g);
  return finish_forward(x, dims, out, u, save, seed_offset);
}

Grads6 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u,
                            const at::Tensor& seed_offset, double scaling, double dropout_p, std::array<bool, 5> need,
                            const std::optional<at::Tensor>& gate, bool gate_grad) {
  const Dims dims = check_lora(x, weight, std::nullopt, lora_A, lora_B, dropout_p);
  check_like(grad_out, "lora_linear_backward", "grad_out", x, "x");
  const auto g = check_gate("lora_linear_backward", gate, x);
  TORCH_CHECK_VALUE(!gate_grad || g, "lora_linear_backward: gate_grad needs the forward's gate");
  // The dropout mask is regenerated from the forward's (seed, offset): read on the host (CPU) or by
  // the kernels (CUDA), so it must be there.
  TORCH_CHECK_VALUE(
      dropout_p == 0.0 ||
          (seed_offset.numel() == 2 && seed_offset.scalar_type() == at::kLong && seed_offset.device() == x.device()),
      "lora_linear_backward: with dropout_p > 0, seed_offset must be the forward's int64 [2] on x's "
      "device (",
      x.device(), "); got ", seed_offset.scalar_type(), " ", seed_offset.sizes(), " on ", seed_offset.device());
  const at::Tensor so = seed_offset.contiguous();
#ifdef PEFTKERN_WITH_CUDA
  if (x.is_cuda())
    return backward_cuda(grad_out, x, dims, weight, lora_A, lora_B, u, so, scaling, dropout_p, need, g, gate_grad);
#endif
  const auto [need_dx, need_dw, need_db, need_dA, need_dB] = need;
  const at::Tensor g2 = grad_out.reshape({dims.rows, dims.n_out});
  const at::Tensor x2 = x.reshape({dims.rows, dims.n_in});
  at::Tensor mask;
  if (dropout_p > 0) {
    const int64_t* v = so.data_ptr<int64_t>();
    mask = cpu::dropout_mask(dims.rows, dims.n_in, static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1]), dropout_p);
  }
  auto [dx_low, dA, dB, dgate] = composite_backward(g2, x2, u.reshape({dims.rows, dims.r}), lora_A, lora_B, scaling,
                                                    mask, need_dx, need_dA, need_dB, g, gate_grad);
  at::Tensor dx, dw, db;
  if (need_dx) dx = (at::mm(g2, weight) + dx_low).to(x.scalar_type());
  if (need_dw) dw = at::mm(g2.t(), x2);
  if (need_db) db = g2.sum(0);
  return finish_backward(x, dx, dw, db, dA, dB, dgate);
}

void register_impls(torch::Library& m) {
  m.impl("lora_linear_forward", fresh_outputs<&lora_linear_forward>);
  m.impl("lora_linear_backward", fresh_outputs<&lora_linear_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
