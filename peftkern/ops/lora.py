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
    gate: Optional[Tensor] = None,
) -> Tensor:
    """LoRA linear layer::

        out = x @ weight.T + bias + scaling * g * (dropout(x) @ lora_A.T) @ lora_B.T,   g = gate[..., None]

    x ``[..., in]``; weight ``[out, in]`` (usually frozen); bias ``[out]`` or None; lora_A ``[r, in]``;
    lora_B ``[out, r]``; scaling = lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA). Dropout
    (probability ``dropout_p`` in [0, 1), only when ``training``) applies to the LoRA branch only,
    as Hugging Face peft does; its mask comes from a Philox stream seeded by torch's generator
    (follows ``torch.manual_seed``) and is regenerated in the backward, never stored.
    ``gate`` (``x.shape[:-1]``, x's dtype; None = 1): a per-row scale of the update, such as
    UniPELT's ``sigmoid(x @ w_g.T + b_g)``; it gets a gradient, computed in the update's backward.

    Gradients flow to every input that requires one; a frozen weight costs no gradient work.
    Saved for the backward: x, weight, lora_A, lora_B, the rank-r hidden ``dropout(x) @ lora_A.T``
    and the dropout seed. CUDA: base product through cuBLAS, the rest in fused kernels for
    float32/float16/bfloat16 and r <= 256 (other cases: an unfused, slower composite).
    """
    _checks.tensors(
        "lora_linear",
        ("bias", "gate"),
        x=x,
        weight=weight,
        bias=bias,
        lora_A=lora_A,
        lora_B=lora_B,
        gate=gate,
    )
    scaling = _checks.real("lora_linear", "scaling", scaling)
    dropout_p = _checks.real("lora_linear", "dropout_p", dropout_p)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, gate)
    )
    out, _, _ = torch.ops.peftkern.lora_linear_forward(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, bool(training), save, gate
    )
    return out


def dropout_mask(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    """The dropout factors (0 or 1/(1-p), float32, x's shape) peftkern applies for a (seed, offset)
    pair; lets tests check a dropout forward and backward against the eager formula. Only x's
    shape and device matter."""
    _checks.tensors("dropout_mask", x=x, seed_offset=seed_offset)
    return torch.ops.peftkern.dropout_mask(x.detach(), seed_offset, _checks.real("dropout_mask", "p", p))


@torch.library.register_fake("peftkern::lora_linear_forward")
def _lora_forward_fake(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, save_for_backward, gate=None
):
    _checks.same_device(
        "lora_linear", ("x", x), weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, gate=gate
    )
    lead = x.shape[:-1]
    out = x.new_empty((*lead, weight.shape[0]))
    u = x.new_empty((*lead, lora_A.shape[0])) if save_for_backward else x.new_empty((0,))
    drop = training and dropout_p > 0
    seed_offset = x.new_empty((2,) if drop else (0,), dtype=torch.int64)
    return out, u, seed_offset


@torch.library.register_fake("peftkern::lora_linear_backward")
def _lora_backward_fake(
    grad_out,
    x,
    weight,
    lora_A,
    lora_B,
    lora_hidden,
    seed_offset,
    scaling,
    dropout_p,
    output_mask,
    gate=None,
    gate_grad=False,
):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, x.shape[:-1])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, [*output_mask, gate_grad]))


@torch.library.register_fake("peftkern::dropout_mask")
def _dropout_mask_fake(x, seed_offset, p):
    _checks.same_device("dropout_mask", ("x", x), seed_offset=seed_offset)
    return x.new_empty(x.shape, dtype=torch.float32)


def _lora_setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, training, _save, *rest = inputs
    gate = rest[0] if rest else None
    _, u, seed_offset = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed_offset, gate)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p if training else 0.0


def _lora_backward(ctx, grad_out, _grad_u, _grad_seed):
    x, weight, lora_A, lora_B, u, seed_offset, gate = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(n) for n in need[:5]]  # x, weight, bias, lora_A, lora_B
    gate_grad = len(need) > 9 and bool(need[9])
    grads = (None,) * 6
    if any(mask) or gate_grad:
        grads = torch.ops.peftkern.lora_linear_backward(
            grad_out,
            x,
            weight,
            lora_A,
            lora_B,
            u,
            seed_offset,
            ctx.scaling,
            ctx.dropout_p,
            mask,
            gate,
            gate_grad,
        )
    return (*grads[:5], None, None, None, None, grads[5])


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


def dora_weight_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, weight_norm: Optional[Tensor] = None
) -> Tensor:
    """DoRA's (Liu et al. 2024) row norms of the adapted weight, ``‖W + scaling·B·A‖`` per output row,
    float32 ``[out]`` (float64 for float64 weights), detached (DoRA treats the norm as a constant),
    without forming the ``[out, in]`` matrix::

        sqrt(‖W_i‖² + δ_i),   δ_i = 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ

    one thin GEMM ``W Aᵀ`` (``[out, r]``, one read of W) and an r × r Gram. Where δ_i is exactly 0
    (B = 0, as DoRA starts) the result is ``‖W_i‖`` itself, ``torch.linalg.norm(W, dim=1)`` bit for
    bit, the value peft starts the magnitude at: the square root of its square is not always
    ‖W_i‖ again, and the DoRA scale must be exactly 1 there. weight ``[out, in]`` (any strides: a
    Conv1D's ``[in, out]`` weight goes in as its ``.t()`` view); ``weight_norm``: ``‖W_i‖`` (float32
    ``[out]``) when the caller keeps it for a frozen weight, else computed here. A composite of
    ATen ops. The expansion cancels where a row of W + s·B·A is much smaller than W's (relative
    error ~ eps·‖W_i‖² / ‖W_i + s·B_i·A‖², eps of float32); DoRA's update is small against W in
    practice."""
    _checks.tensors(
        "dora_weight_norm",
        ("weight_norm",),
        weight=weight,
        lora_A=lora_A,
        lora_B=lora_B,
        weight_norm=weight_norm,
    )
    s = _checks.real("dora_weight_norm", "scaling", scaling)
    n_out, n_in = weight.shape if weight.dim() == 2 else (-1, -1)
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    if weight.dim() != 2 or lora_A.shape != (r, n_in) or lora_B.shape != (n_out, r):
        raise ValueError(
            f"dora_weight_norm: expected weight [out, in], lora_A [r, in], lora_B [out, r]; got weight "
            f"{tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if weight_norm is not None and weight_norm.shape != (n_out,):
        raise ValueError(f"dora_weight_norm: weight_norm must be [{n_out}]; got {tuple(weight_norm.shape)}")
    _checks.same_device(
        "dora_weight_norm", ("weight", weight), lora_A=lora_A, lora_B=lora_B, weight_norm=weight_norm
    )
    acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights
    with torch.no_grad():
        w_norm = (
            torch.linalg.vector_norm(weight, dim=1, dtype=acc) if weight_norm is None else weight_norm.to(acc)
        )
        a, b = lora_A.to(acc), lora_B.to(acc)
        if weight.dtype == acc:
            w_at = torch.mm(weight, a.t())
        elif weight.is_cuda:  # half weights: cuBLAS accumulates and writes float32, W stays as is
            w_at = torch.mm(weight, lora_A.to(weight.dtype).t(), out_dtype=acc)
        else:  # the CPU path: a float32 copy of W
            w_at = torch.mm(weight.to(acc), a.t())
        delta = 2 * s * (b * w_at).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
        adapted = (w_norm.square() + delta).clamp_min(0).sqrt()  # rounding can take a 0 a hair below it
        return torch.where(delta == 0, w_norm, adapted)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_norm: Optional[Tensor] = None,
) -> Tensor:
    """DoRA linear layer, as Hugging Face peft computes it (the norm detached)::

        c   = magnitude / ‖W + s·B·A‖_row                       (dora_weight_norm, no gradient)
        out = bias + c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ)                                  (eval, or no dropout)
        out = bias + (x − x̃) Wᵀ + c ⊙ (x̃ Wᵀ + s·(x̃ Aᵀ) Bᵀ),  x̃ = dropout(x)  (training, dropout_p > 0)

    Shapes as ``lora_linear``; magnitude ``[out]``. Gradients to x, weight, bias, lora_A, lora_B and
    magnitude. A composite. Without dropout: one ``lora_linear`` with the bias (base GEMM with the
    bias in it, as ``F.linear`` adds it; fused low-rank update), then one ``addcmul`` pass,
    ``c ⊙ bracket + (1 − c) ⊙ bias``, which saves the bracket (``[..., out]``) for magnitude's
    gradient. So a fresh adapter (B = 0, magnitude = ``torch.linalg.norm(W, dim=1)``: c = 1
    exactly) gives ``F.linear(x, W, bias)`` bit for bit, as peft's layer does. With dropout in
    training, x̃ is drawn by ``torch.nn.functional.dropout`` (torch's generator, as peft's
    ``nn.Dropout``) and stored, and the base product runs twice, as peft's form requires: the slower
    path, whose fresh-adapter output equals the base to float rounding, not bit for bit (on x − x̃
    and x̃, its two GEMMs round apart)."""
    _checks.tensors("dora_linear", ("bias",), x=x, magnitude=magnitude, weight=weight, bias=bias)
    if not x.is_floating_point():
        raise TypeError(f"dora_linear: x must be a floating-point tensor; got {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(
            f"dora_linear: weight must have shape [out_features, in_features]; got {tuple(weight.shape)}"
        )
    n_out = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("bias", bias)):
        if t is not None and t.shape != (n_out,):
            raise ValueError(
                f"dora_linear: {name} must have shape [out_features] = [{n_out}]; got {tuple(t.shape)}"
            )
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"dora_linear: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    _checks.same_device("dora_linear", ("x", x), weight=weight, bias=bias, magnitude=magnitude)
    dropout_p = _checks.real("dora_linear", "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dora_linear: dropout_p must be in [0, 1); got {dropout_p}")
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling=scaling, weight_norm=weight_norm)
    scale = (magnitude / norm).to(x.dtype)
    if not (training and dropout_p > 0):
        bracket = lora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling)
        return bracket * scale if bias is None else torch.addcmul((1 - scale) * bias, bracket, scale)
    dropped = torch.nn.functional.dropout(x, dropout_p, training=True)
    bracket = lora_linear(dropped, weight, None, lora_A, lora_B, scaling=scaling)
    return torch.addcmul(torch.nn.functional.linear(x - dropped, weight, bias), bracket, scale)
