"""Prefix attention (prefix tuning, Li & Liang 2021; P-tuning v2): attention over [prefix KV;
sequence KV] without building the concatenation."""

from typing import Optional

import torch
from torch import Tensor

from . import _checks


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_ids: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    prefix_gate: Optional[Tensor] = None,
    prefix_bias: Optional[Tensor] = None,
) -> Tensor:
    """Attention with learned prefix keys/values in front of the sequence's::

        K' = [prefix_k ; k],  V' = [prefix_v ; v]          # along the key axis, per sample
        out = softmax(q @ K'.T * scale + [prefix_bias ; mask]) @ V'

    q ``[B, H, L, D]``; k, v ``[B, Hkv, S, D]`` with ``H % Hkv == 0`` (grouped-query attention:
    query head h reads kv head ``h // (H // Hkv)``); prefix_k, prefix_v ``[Hkv, P, D]`` shared by the
    batch, or ``[T, Hkv, P, D]`` with ``prefix_ids [B]`` choosing each sample's task prefix. ``scale``
    defaults to ``1/sqrt(D)``. P = 0 and S = 0 are allowed.

    The mask covers the sequence keys only; every query sees the whole prefix.
    ``causal``: sequence key j is visible to query i when ``j <= i + (S - L)`` (bottom-right
    aligned, so decoding over a KV cache works). ``attn_mask``: a bool tensor (True = attend) or an
    additive mask of q's dtype, broadcastable to ``[B, H, L, S]`` (what a Hugging Face model hands
    its attention function for padded batches); it combines with ``causal``. A query whose sequence
    keys are all masked attends to the prefix alone; one that sees no key at all outputs zeros.
    No gradient flows to the mask (one that requires grad is refused).

    ``prefix_gate`` (None = 1): a per-query-row gate broadcastable to ``[B, H, L]`` (``[B, 1, L]``:
    one per token, shared by the heads; UniPELT's ``sigmoid(h @ w_g.T + b_g)``), of q's dtype. It
    scales the prefix's share of each row's output, ``out = P_seq @ v + g * (P_prefix @ prefix_v)``
    with P the joint (ungated) softmax; its gradient is computed in the prefix part's backward.

    ``prefix_bias`` (None = 0): an additive bias of the prefix keys' scores, a float tensor of q's
    dtype broadcastable to ``[B, H, L, P]`` (typically ``[1, H, L, P]``; T5's relative position
    bias for the prefix keys, key p sitting at relative position ``p - P - i`` from query i):
    ``scores_prefix = q @ prefix_k.T * scale + prefix_bias``; the sequence keys keep ``attn_mask``.
    It combines with ``prefix_ids`` (one bias for every task's prefix, all of length P),
    ``prefix_gate``, ``causal`` and ``attn_mask``. No gradient flows to it (one that requires grad
    is refused).

    Gradients for q, k, v and the prefixes (summed over the samples that use each prefix, in a
    fixed order). Saved for the backward: the inputs, the output and the row log-sum-exp; never the
    concatenated KV. The output is ``[B, H, L, D]`` over ``[B, L, H, D]`` memory, as PyTorch's flash
    attention returns it (``out.transpose(1, 2).reshape(B, L, H * D)`` is free).

    How it runs: the sequence part on PyTorch's fused attention (CUDA: flash, else memory-efficient,
    else cuDNN, whichever the inputs fit and ``torch.nn.attention.sdpa_kernel`` leaves enabled; CPU:
    its flash kernel), the prefix part and the merge by log-sum-exp in a hand-written CUDA kernel
    (fp16/bf16, head dim a multiple of 8 up to 256, sm_80+). Other cases (float32, float64, other
    head dims, the math backend) compute the parts with ATen products: correct, slower.
    Under CUDA graph capture ``prefix_ids`` is not range-checked; a sample with an out-of-range id
    attends to no prefix.
    """
    _checks.tensors(
        "prefix_attention",
        ("prefix_ids", "attn_mask", "prefix_gate", "prefix_bias"),
        q=q,
        k=k,
        v=v,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        prefix_ids=prefix_ids,
        attn_mask=attn_mask,
        prefix_gate=prefix_gate,
        prefix_bias=prefix_bias,
    )
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "prefix_attention: attn_mask requires grad, but no gradient flows to the mask; "
            "pass attn_mask.detach()"
        )
    if prefix_bias is not None and prefix_bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "prefix_attention: prefix_bias requires grad, but no gradient flows to the prefix bias; "
            "pass prefix_bias.detach()"
        )
    if scale is not None:
        scale = _checks.real("prefix_attention", "scale", scale)
    if prefix_gate is not None and q.dim() == 4:
        rows = (q.shape[0], q.shape[1], q.shape[2])
        if prefix_gate.dim() != 3:  # a [B, L] gate would line up as [H, L]
            raise ValueError(
                f"prefix_attention: prefix_gate must be 3-D, broadcastable to [B, H, L] = {list(rows)} "
                f"([B, 1, L] for one gate per token); got {list(prefix_gate.shape)}"
            )
        try:
            prefix_gate = prefix_gate.expand(rows)  # a view: autograd sums the gradient back
        except RuntimeError:
            raise ValueError(
                f"prefix_attention: prefix_gate must be broadcastable to [B, H, L] = {list(rows)}; got "
                f"{list(prefix_gate.shape)}"
            ) from None
    out, _ = torch.ops.peftkern.prefix_attention_forward(
        q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, bool(causal), scale, prefix_gate, prefix_bias
    )
    return out


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("peftkern::prefix_attention_forward")
def _prefix_attention_fake(
    q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, causal, scale, prefix_gate=None, prefix_bias=None
):
    _checks.same_device(
        "prefix_attention",
        ("q", q),
        k=k,
        v=v,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        prefix_ids=prefix_ids,
        attn_mask=attn_mask,
        prefix_gate=prefix_gate,
        prefix_bias=prefix_bias,
    )
    B, H, L, D = q.shape
    out = q.new_empty(B, L, H, D).transpose(1, 2)
    return out, q.new_empty(B, H, L, dtype=_lse_dtype(q))


@torch.library.register_fake("peftkern::prefix_attention_backward")
def _prefix_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_ids,
    attn_mask,
    out,
    lse,
    causal,
    scale,
    output_mask,
    prefix_gate=None,
    gate_grad=False,
    prefix_bias=None,
):
    like = (q, k, v, prefix_k, prefix_v)
    grads = [torch.empty_like(t) if need else None for t, need in zip(like, output_mask)]
    return (*grads, q.new_empty(q.shape[:3]) if gate_grad else None)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, causal, scale, *rest = inputs
    gate = rest[0] if rest else None
    bias = rest[1] if len(rest) > 1 else None
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, out, lse, gate, bias)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, prefix_ids, attn_mask, out, lse, gate, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(n) for n in need[:5]]
    gate_grad = len(need) > 9 and bool(need[9])
    grads = (None,) * 6
    if any(mask) or gate_grad:
        grads = torch.ops.peftkern.prefix_attention_backward(
            grad_out,
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            prefix_ids,
            attn_mask,
            out,
            lse,
            ctx.causal,
            ctx.scale,
            mask,
            gate,
            gate_grad,
            bias,
        )
    return (*grads[:5], None, None, None, None, grads[5], None)  # none for the mask or the bias


torch.library.register_autograd("peftkern::prefix_attention_forward", _backward, setup_context=_setup_context)
