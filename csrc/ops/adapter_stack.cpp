// peftkern::adapter_stack_forward / adapter_stack_backward: all N adapters of a stack on the same
// tokens, out[..., n, :] = scale * (act(x @ w_down[n]^T + b_down[n]) @ w_up[n]^T + b_up[n]), no
// residual (AdapterFusion attends over these). The dense products of cpu/adapter_stack.h on every
// device: on CUDA they run on cuBLAS, which already moves x once and each output once (the only
// extra traffic, the rank-N*r bottleneck, is N*r / d of it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/adapter_stack.h"
#include "ops/common.h"
#include "ops/lowrank.h"

namespace peftkern::ops {
namespace {

constexpr const char* kOp = "adapter_stack";

struct Dims {
  int64_t rows, d, r, n;
};

Dims check_stack(const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                 const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  check_floating(x, kOp, "x");
  check_like(w_down, kOp, "w_down", x, "x");
  check_like(b_down, kOp, "b_down", x, "x");
  check_like(w_up, kOp, "w_up", x, "x");
  check_like(b_up, kOp, "b_up", x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, kOp, ": x must have shape [..., d] with d >= 1; got ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) >= 1 && w_down.size(1) >= 1 && w_down.size(2) == d, kOp,
                    ": w_down must have shape [N, r, d] with N >= 1, r >= 1 and d = ", d, " (x's last dimension); got ",
                    w_down.sizes());
  const int64_t n = w_down.size(0), r = w_down.size(1);
  TORCH_CHECK_VALUE(w_up.dim() == 3 && w_up.size(0) == n && w_up.size(1) == d && w_up.size(2) == r, kOp,
                    ": w_up must have shape [N, d, r] = [", n, ", ", d, ", ", r, "]; got ", w_up.sizes());
  TORCH_CHECK_VALUE(!b_down || (b_down->dim() == 2 && b_down->size(0) == n && b_down->size(1) == r), kOp,
                    ": b_down must have shape [N, r] = [", n, ", ", r, "]; got ",
                    b_down ? b_down->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!b_up || (b_up->dim() == 2 && b_up->size(0) == n && b_up->size(1) == d), kOp,
                    ": b_up must have shape [N, d] = [", n, ", ", d, "]; got ", b_up ? b_up->sizes() : at::IntArrayRef{});
  return {x.numel() / d, d, r, n};
}

// [..., N, last] for x [..., d]
std::vector<int64_t> stacked(at::IntArrayRef x_shape, int64_t n, int64_t last) {
  std::vector<int64_t> s(x_shape.begin(), x_shape.end() - 1);
  s.push_back(n);
  s.push_back(last);
  return s;
}

std::tuple<at::Tensor, at::Tensor> adapter_stack_forward(const at::Tensor& x, const at::Tensor& w_down,
                                                         const std::optional<at::Tensor>& b_down,
                                                         const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                         c10::string_view activation, double scale, bool save) {
  const Dims dims = check_stack(x, w_down, b_down, w_up, b_up);
  const Activation act = parse_activation(kOp, activation);
  auto [out, z] =
      cpu::adapter_stack_forward(x.reshape({dims.rows, dims.d}), w_down, b_down, w_up, b_up, act, scale, save);
  return {out.view(stacked(x.sizes(), dims.n, dims.d)), save ? z.view(stacked(x.sizes(), dims.n, dims.r)) : z};
}

Grads5 adapter_stack_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z,
                              const at::Tensor& w_down, const at::Tensor& w_up, c10::string_view activation,
                              double scale, std::array<bool, 5> need) {
  const Dims dims = check_stack(x, w_down, std::nullopt, w_up, std::nullopt);
  check_like(grad_out, "adapter_stack_backward", "grad_out", x, "x");
  check_like(z, "adapter_stack_backward", "bottleneck", x, "x");
  const auto out_shape = stacked(x.sizes(), dims.n, dims.d);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "adapter_stack_backward: grad_out must have shape ",
                    at::IntArrayRef(out_shape), "; got ", grad_out.sizes());
  TORCH_CHECK_VALUE(z.numel() == dims.rows * dims.n * dims.r,
                    "adapter_stack_backward: bottleneck must hold [rows, N, r] = [", dims.rows, ", ", dims.n, ", ",
                    dims.r, "] values (the forward ran with save_bottleneck=False?); got ", z.sizes());
  const Activation act = parse_activation(kOp, activation);
  auto [dx, dwd, dbd, dwu, dbu] =
      cpu::adapter_stack_backward(grad_out.reshape({dims.rows, dims.n, dims.d}), x.reshape({dims.rows, dims.d}),
                                  z.reshape({dims.rows, dims.n, dims.r}), w_down, w_up, act, scale, need);
  return {dx.defined() ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt, defined_or_none(dwd),
          defined_or_none(dbd), defined_or_none(dwu), defined_or_none(dbu)};
}

void register_impls(torch::Library& m) {
  m.impl("adapter_stack_forward", fresh_outputs<&adapter_stack_forward>);
  m.impl("adapter_stack_backward", fresh_outputs<&adapter_stack_backward>);
}

}  // namespace

PEFTKERN_REGISTER_IMPLS(register_impls)

}  // namespace peftkern::ops
