"""LoRA (Hu et al. 2021) as one op: base product plus the scaled low-rank update, dropout fused."""

from typing import Optional

import torch
from torch import Tensor

from . import _checks


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """LoRA linear layer::

        out = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

    x ``[..., in]``; weight ``[out, in]`` (usually frozen); bias ``[out]`` or None; lora_A ``[r, in]``;
    lora_B ``[out, r]``; scaling = lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA). Dropout
    (probability ``dropout_p`` in [0, 1), only when ``training``) applies to the LoRA branch only,
    as Hugging Face peft does; its mask comes from a Philox stream seeded by torch's generator
    (follows ``torch.manual_seed``) and is regenerated in the backward, never stored.

    Gradients flow to every input that requires one; a frozen weight costs no gradient work.
    Saved for the backward: x, weight, lora_A, lora_B, the rank-r hidden ``dropout(x) @ lora_A.T``
    and the dropout seed. CUDA: base product through cuBLAS, the rest in fused kernels for
    float32/float16/bfloat16 and r <= 256 (other cases: an unfused, slower composite).
    """
    _checks.tensors("lora_linear", ("bias",), x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    scaling = _checks.real("lora_linear", "scaling", scaling)
    dropout_p = _checks.real("lora_linear", "dropout_p", dropout_p)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)
    )
    out, _, _ = torch.ops.peftkern.lora_linear_forward(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, bool(training), save
    )
    return out


def dropout_mask(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    """The dropout factors (0 or 1/(1-p), float32, x's shape) peftkern applies for a (seed, offset)
    pair; lets tests check a dropout forward and backward against the eager formula. Only x's
    shape and device matter."""
    _checks.tensors("dropout_mask", x=x, seed_offset=seed_offset)
    return torch.ops.peftkern.dropout_mask(x.detach(), seed_offset, _checks.real("dropout_mask", "p", p))


@torch.library.register_fake("peftkern::lora_linear_forward")
def _lora_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, save_for_backward):
    _checks.same_device("lora_linear", ("x", x), weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    lead = x.shape[:-1]
    out = x.new_empty((*lead, weight.shape[0]))
    u = x.new_empty((*lead, lora_A.shape[0])) if save_for_backward else x.new_empty((0,))
    drop = training and dropout_p > 0
    seed_offset = x.new_empty((2,) if drop else (0,), dtype=torch.int64)
    return out, u, seed_offset


@torch.library.register_fake("peftkern::lora_linear_backward")
def _lora_backward_fake(
    grad_out, x, weight, lora_A, lora_B, lora_hidden, seed_offset, scaling, dropout_p, output_mask
):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


@torch.library.register_fake("peftkern::dropout_mask")
def _dropout_mask_fake(x, seed_offset, p):
    _checks.same_device("dropout_mask", ("x", x), seed_offset=seed_offset)
    return x.new_empty(x.shape, dtype=torch.float32)


def _lora_setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, training, _save = inputs
    _, u, seed_offset = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed_offset)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p if training else 0.0


def _lora_backward(ctx, grad_out, _grad_u, _grad_seed):
    x, weight, lora_A, lora_B, u, seed_offset = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]  # x, weight, bias, lora_A, lora_B
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.lora_linear_backward(
            grad_out, x, weight, lora_A, lora_B, u, seed_offset, ctx.scaling, ctx.dropout_p, mask
        )
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "peftkern::lora_linear_forward", _lora_backward, setup_context=_lora_setup_context
)


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    adapter_ids: Tensor,
    *,
    scalings,
) -> Tensor:
    """One base layer, L LoRA adapters, each token its own (the serving case of Punica / S-LoRA)::

        out[t] = x[t] @ weight.T + bias + scalings[i] * (x[t] @ lora_A[i].T) @ lora_B[i].T
        i = adapter_ids[t]

    x ``[..., in]`` (tokens = x.numel() / in); lora_A ``[L, r, in]``; lora_B ``[L, out, r]``;
    adapter_ids ``[tokens]`` int32/int64 in [-1, L), -1 = no adapter (base only); scalings ``[L]``
    (a tensor or a sequence of floats). No dropout (inference).

    CUDA forward: tokens are grouped by adapter on the device (no host sync), then one fused
    kernel adds each 64-token block's update, reading that adapter's weights once per block.
    The ids' range is checked with one host read (skipped inside CUDA graph capture, where ids
    out of range act as -1). The backward (to x, weight, bias and the adapters) and the CPU path
    are a slower per-adapter composite; it reads the per-adapter token counts on the host, or
    under capture masks every row once per adapter (slower still).
    """
    _checks.tensors(
        "lora_linear_multi",
        ("bias",),
        x=x,
        weight=weight,
        bias=bias,
        lora_A=lora_A,
        lora_B=lora_B,
        adapter_ids=adapter_ids,
    )
    if not isinstance(scalings, torch.Tensor):
        scalings = _checks.reals("lora_linear_multi", "scalings", scalings)
        scalings = torch.tensor(scalings, dtype=torch.float32, device=x.device)
    return torch.ops.peftkern.lora_linear_multi_forward(
        x, weight, bias, lora_A, lora_B, adapter_ids, scalings
    )


@torch.library.register_fake("peftkern::lora_linear_multi_forward")
def _lora_multi_forward_fake(x, weight, bias, lora_A, lora_B, adapter_ids, scalings):
    _checks.same_device(
        "lora_linear_multi",
        ("x", x),
        weight=weight,
        bias=bias,
        lora_A=lora_A,
        lora_B=lora_B,
        adapter_ids=adapter_ids,
        scalings=scalings,
    )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("peftkern::lora_linear_multi_backward")
def _lora_multi_backward_fake(grad_out, x, weight, lora_A, lora_B, adapter_ids, scalings, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _lora_multi_setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, adapter_ids, scalings = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, adapter_ids, scalings)


def _lora_multi_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, adapter_ids, scalings = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.lora_linear_multi_backward(
            grad_out, x, weight, lora_A, lora_B, adapter_ids, scalings, mask
        )
    return (*grads, None, None)


torch.library.register_autograd(
    "peftkern::lora_linear_multi_forward", _lora_multi_backward, setup_context=_lora_multi_setup_context
)
