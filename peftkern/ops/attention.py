"""Prefix attention (prefix tuning, Li & Liang 2021; P-tuning v2): attention over [prefix KV;
sequence KV] without building the concatenation."""

from typing import Optional

import torch
from torch import Tensor


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_ids: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tensor:
    """Attention with learned prefix keys/values in front of the sequence's::

        K' = [prefix_k ; k],  V' = [prefix_v ; v]          # along the key axis, per sample
        out = softmax(q @ K'.T * scale + mask) @ V'

    q ``[B, H, L, D]``; k, v ``[B, Hkv, S, D]`` with ``H % Hkv == 0`` (grouped-query attention:
    query head h reads kv head ``h // (H // Hkv)``); prefix_k, prefix_v ``[Hkv, P, D]`` shared by the
    batch, or ``[T, Hkv, P, D]`` with ``prefix_ids [B]`` choosing each sample's task prefix. ``scale``
    defaults to ``1/sqrt(D)``. ``causal``: every query sees the whole prefix, and sequence key j only
    when ``j <= i + (S - L)`` (bottom-right aligned, so decoding over a KV cache works). P may be 0.
    A query that sees no key at all (causal, P = 0, L > S) outputs zeros.

    Gradients for q, k, v and the prefixes (summed over the samples that use each prefix). Saved for
    the backward: the inputs, the output and the row log-sum-exp; never the concatenated KV.
    CUDA: hand-written flash-style kernels (online softmax, float32 statistics) for fp16/bf16 and
    head dims 64 and 128; float32, float64 and other head dims run a slower composite that builds
    the concatenation.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, _ = torch.ops.peftkern.prefix_attention_forward(q, k, v, prefix_k, prefix_v, prefix_ids, bool(causal),
                                                          float(scale))
    return out


@torch.library.register_fake("peftkern::prefix_attention_forward")
def _prefix_attention_fake(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("peftkern::prefix_attention_backward")
def _prefix_attention_backward_fake(grad_out, q, k, v, prefix_k, prefix_v, prefix_ids, out, lse, causal, scale,
                                   output_mask):
    like = (q, k, v, prefix_k, prefix_v)
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, prefix_ids, out, lse = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_ids, out,
                                                             lse, ctx.causal, ctx.scale, mask)
    return (*grads, None, None, None)


torch.library.register_autograd("peftkern::prefix_attention_forward", _backward, setup_context=_setup_context)
