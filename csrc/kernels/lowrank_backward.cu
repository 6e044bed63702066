// Fused low-rank update backward: plan, workspace and the dtype dispatch. The kernels are in
// lowrank_backward.cuh, compiled one dtype per translation unit (lowrank_backward_{f32,f16,bf16}.cu).
#include "lowrank_backward.cuh"

namespace peftkern::kernels {

using namespace lowrank_backward_detail;

int lowrank_backward_smem_bytes(DType dtype, int r) {
  int bytes = 0;
  dispatch_dtype(dtype, [&](auto t) {
    return dispatch_padded_rank(std::min(r, kLowRankMaxFusedRank), [&](auto rank) {
      using T = typename decltype(t)::type;
      constexpr int RP = decltype(rank)::value;
      bytes = std::max(rows_smem_bytes<T, RP>(), ColsCfg<T, RP>::kSmemBytes);
      return cudaSuccess;
    });
  });
  return bytes;
}

size_t lowrank_backward_workspace_bytes(const LowRankBackwardArgs& a) { return a.rows == 0 ? 0 : make_plan(a).total; }

cudaError_t lowrank_backward(const LowRankBackwardArgs& a, cudaStream_t stream) {
  if (a.r < 1 || a.r > kLowRankMaxFusedRank || a.n_in < 1 || a.n_out < 1) return cudaErrorInvalidValue;
  if (a.dx_mode == DxMode::kWritePlusGradOut && a.n_in != a.n_out) return cudaErrorInvalidValue;
  if (a.dropout.p > 0.f && !a.dropout.seed_offset) return cudaErrorInvalidValue;
  if (a.rows == 0) return zero_weight_grads(a, stream);  // empty batch: zero weight gradients
  const Plan p = make_plan(a);
  if (a.workspace_bytes < p.total || (p.total > 0 && a.workspace == nullptr)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(a.workspace);
  const bool any_weight_grad = a.dw_up || a.db_up || a.dw_down || a.db_down;
  if (!a.dx && !any_weight_grad && !a.dgate) return cudaSuccess;

  return dispatch_dtype(a.dtype, [&](auto dtype) {
    return launch<typename decltype(dtype)::type>(a, p, ws, any_weight_grad, stream);
  });
}

}  // namespace peftkern::kernels
