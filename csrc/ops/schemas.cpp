// Every peftkern op schema, in one place. Forward and backward are separate ops; the autograd
// formulas that join them live in peftkern/ops/*.py (torch.library.register_autograd).
#include <torch/library.h>

TORCH_LIBRARY(peftkern, m) {
  // Bottleneck adapter: out = (residual or x) + scale * g * (act(x @ w_down^T + b_down) @ w_up^T +
  // b_up), g = gate[..., None] (a per-row gate, x.shape[:-1]; None = 1). The second output is the
  // pre-activation z = x @ w_down^T + b_down [..., r] when save_bottleneck (for the backward), else
  // an empty tensor.
  m.def(
      "adapter_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor? residual, str activation, float scale, bool save_bottleneck, Tensor? gate=None) -> (Tensor, Tensor)");
  // Gradients (x, w_down, b_down, w_up, b_up) for the entries set in output_mask, and the gate's
  // when gate_grad (it needs the forward's b_up), None otherwise.
  m.def(
      "adapter_backward(Tensor grad_out, Tensor x, Tensor bottleneck, Tensor w_down, Tensor w_up, "
      "str activation, float scale, bool residual_is_x, bool[5] output_mask, Tensor? gate=None, Tensor? b_up=None, "
      "bool gate_grad=False) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // Multi-adapter batch (L adapters, each token its own): out[t] = res[t] + scale * (act(x[t] @
  // w_down[i]^T + b_down[i]) @ w_up[i]^T + b_up[i]) with i = adapter_ids[t], -1 = no adapter
  // (out[t] = res[t]); res = residual or x. The bottleneck output as adapter_forward's (0 in the
  // rows of no adapter).
  m.def(
      "adapter_multi_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor adapter_ids, Tensor? residual, str activation, float scale, bool save_bottleneck) -> (Tensor, Tensor)");
  m.def(
      "adapter_multi_backward(Tensor grad_out, Tensor x, Tensor bottleneck, Tensor w_down, Tensor w_up, "
      "Tensor adapter_ids, str activation, float scale, bool residual_is_x, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // A stack of N adapters on the same tokens, no residual: out[..., n, :] = scale * (act(x @
  // w_down[n]^T + b_down[n]) @ w_up[n]^T + b_up[n]) [..., N, d]; bottleneck z [..., N, r] when saved.
  m.def(
      "adapter_stack_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation, float scale, bool save_bottleneck) -> (Tensor, Tensor)");
  m.def(
      "adapter_stack_backward(Tensor grad_out, Tensor x, Tensor bottleneck, Tensor w_down, Tensor w_up, "
      "str activation, float scale, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // LoRA: out = x @ weight^T + bias + scaling * g * (dropout(x) @ lora_A^T) @ lora_B^T, dropout only
  // when training; g = gate[..., None] (per row, x.shape[:-1]; None = 1). Outputs: out, the rank-r
  // hidden u = dropout(x) @ lora_A^T [..., r] when save_for_backward (else empty), and the dropout's
  // (seed, offset) int64 [2] (empty without dropout).
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, bool training, bool save_for_backward, Tensor? gate=None) -> (Tensor, Tensor, Tensor)");
  // Gradients (x, weight, bias, lora_A, lora_B) for the entries set in output_mask, and the gate's
  // when gate_grad. dropout_p is the one the forward applied (0 in eval); seed_offset its mask's.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor lora_hidden, Tensor seed_offset, float scaling, float dropout_p, bool[5] output_mask, "
      "Tensor? gate=None, bool gate_grad=False) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // The dropout factors (0 or 1/(1-p), float32, x's shape) that lora_linear applied for seed_offset.
  m.def("dropout_mask(Tensor x, Tensor seed_offset, float p) -> Tensor");

  // Multi-adapter LoRA (one base, L adapters, each token its own): out[t] = x[t] @ weight^T + bias
  // + scalings[i] * (x[t] @ lora_A[i]^T) @ lora_B[i]^T with i = adapter_ids[t], -1 = base only.
  m.def(
      "lora_linear_multi_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor adapter_ids, Tensor scalings) -> Tensor");
  m.def(
      "lora_linear_multi_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor adapter_ids, Tensor scalings, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // Mask tuning: out = x @ (weight * m)^T + bias, m = float32(scores) > threshold. Outputs: out and,
  // when save_for_backward, the mask as packed bits (int32 [out, ceil(in / 32)]), else empty.
  m.def(
      "masked_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor scores, float threshold, "
      "bool save_for_backward) -> (Tensor, Tensor)");
  // Gradients (x, weight, bias, scores) for the entries set in output_mask; scores straight through:
  // d scores = (grad_out^T @ x) * weight.
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scores, Tensor mask_bits, "
      "bool[4] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
  m.def("pack_mask(Tensor scores, float threshold) -> Tensor");
  m.def("unpack_mask(Tensor bits, int[] shape) -> Tensor");
  m.def("masked_linear_packed(Tensor x, Tensor weight, Tensor? bias, Tensor mask_bits) -> Tensor");
  // Each row t of x uses mask_bits_stack[task_ids[t]] (-1: the unmasked weight).
  m.def(
      "masked_linear_multi(Tensor x, Tensor weight, Tensor? bias, Tensor mask_bits_stack, Tensor task_ids) -> Tensor");

  // Prefix attention: softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v] without building the
  // concatenation; attn_mask (bool, True = attend, or additive) covers the sequence keys only.
  // Outputs out [B, H, L, D] and lse [B, H, L] (float32, float64 for float64; +inf where a row sees
  // no key), the row log-sum-exp the backward uses. scale None: 1/sqrt(D).
  // prefix_gate [B, H, L] (None = 1) scales the prefix's share of each query row: out = (sequence
  // part) + g * (prefix part) with the joint softmax's probabilities (lse unchanged).
  // prefix_bias (q's dtype, broadcastable to [B, H, L, P]; None = 0) is added to the prefix keys'
  // scores (T5's relative position bias for the prefix); no gradient is computed for it.
  m.def(
      "prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_ids, "
      "Tensor? attn_mask, bool causal, float? scale, Tensor? prefix_gate=None, "
      "Tensor? prefix_bias=None) -> (Tensor, Tensor)");
  // Gradients (q, k, v, prefix_k, prefix_v) for the entries set in output_mask, and prefix_gate's
  // when gate_grad; prefix gradients summed over the samples that use each prefix. prefix_bias: the
  // forward's.
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_ids, Tensor? attn_mask, Tensor out, Tensor lse, bool causal, float? scale, bool[5] output_mask, "
      "Tensor? prefix_gate=None, bool gate_grad=False, Tensor? prefix_bias=None) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // (IA)^3: out = l * (x @ weight^T + bias) with l = ia3_scale [out] (scale_input false: keys,
  // values), or out = (l * x) @ weight^T + bias with l [in] (scale_input true: the FFN's down
  // projection).
  m.def("ia3_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_scale, bool scale_input) -> Tensor");
  // Gradients (x, weight, bias, ia3_scale) for the entries set in output_mask. out: the forward's
  // output (the output scale's gradient reads it; unused with scale_input).
  m.def(
      "ia3_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor ia3_scale, Tensor out, "
      "bool scale_input, bool[4] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
}
