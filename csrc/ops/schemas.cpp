// Every peftkern op schema, in one place. Forward and backward are separate ops; the autograd
// formulas that join them live in peftkern/ops/*.py (torch.library.register_autograd).
#include <torch/library.h>

TORCH_LIBRARY(peftkern, m) {
  // Bottleneck adapter: out = (residual or x) + scale * (act(x @ w_down^T + b_down) @ w_up^T + b_up).
  // The second output is the pre-activation z = x @ w_down^T + b_down [..., r] when
  // save_bottleneck (for the backward), else an empty tensor.
  m.def(
      "adapter_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor? residual, str activation, float scale, bool save_bottleneck) -> (Tensor, Tensor)");
  // Gradients (x, w_down, b_down, w_up, b_up) for the entries set in output_mask, None otherwise.
  m.def(
      "adapter_backward(Tensor grad_out, Tensor x, Tensor bottleneck, Tensor w_down, Tensor w_up, "
      "str activation, float scale, bool residual_is_x, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}
