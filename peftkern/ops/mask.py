"""Mask tuning (Piggyback, Mallya et al. 2018; Zhao et al. 2020): a frozen weight, learned real-valued
scores, the binary mask m = scores > threshold, straight-through gradients; bit-packed masks for
serving many tasks over one weight."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _checks


def masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *, threshold: float
) -> Tensor:
    """Linear layer through a learned binary mask::

        m   = scores > threshold                  # strict, compared in float32; a NaN score is dropped
        out = x @ (weight * m).T + bias
        d scores = (d out).T @ x * weight          # straight-through: dL/dS := dL/dm = dL/dW_eff * W
        d x      = d out @ (weight * m)

    x ``[..., in]``; weight ``[out, in]`` (frozen, or with a gradient ``dL/dW_eff * m``); bias ``[out]``
    or None; scores ``[out, in]``, float32 or the weight's dtype. Saved for the backward: the inputs
    and the mask as packed bits (1/16 of a bf16 weight); no [out, in] tensor of the op's own.

    CUDA: one pass builds ``weight * m`` (and the bits) for cuBLAS; up to 16 rows without a gradient
    skip that and apply the mask while reading the weight; the backward rebuilds ``weight * m``
    from the bits and applies the straight-through product in one pass.
    """
    _checks.tensors("masked_linear", ("bias",), x=x, weight=weight, bias=bias, scores=scores)
    threshold = _checks.real("masked_linear", "threshold", threshold)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, scores)
    )
    out, _ = torch.ops.peftkern.masked_linear_forward(x, weight, bias, scores, threshold, save)
    return out


def pack_mask(scores: Tensor, threshold: float) -> Tensor:
    """The mask ``scores > threshold`` of a 2-D ``[out, in]`` scores tensor as bits: int32
    ``[out, ceil(in / 32)]``, bit j (least significant first) of word w of row n is element
    ``(n, 32 w + j)``, 1 = kept, trailing bits 0. 1 bit per weight: 1/16 of a bf16 masked weight."""
    _checks.tensors("pack_mask", scores=scores)
    return torch.ops.peftkern.pack_mask(scores.detach(), _checks.real("pack_mask", "threshold", threshold))


def unpack_mask(bits: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool ``[out, in]`` mask from packed bits (inverse of pack_mask)."""
    _checks.tensors("unpack_mask", bits=bits)
    return torch.ops.peftkern.unpack_mask(bits, _checks.int64s("unpack_mask", "shape", shape))


def masked_linear_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_bits: Tensor) -> Tensor:
    """``x @ (weight * unpack(mask_bits)).T + bias`` for inference with a packed mask. CUDA, up to
    16 rows: the mask is applied while the weight is read (weight + bits, nothing materialised).
    Forward only."""
    _checks.tensors("masked_linear_packed", ("bias",), x=x, weight=weight, bias=bias, mask_bits=mask_bits)
    return torch.ops.peftkern.masked_linear_packed(x, weight, bias, mask_bits)


def masked_linear_multi(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_bits_stack: Tensor, task_ids: Tensor
) -> Tensor:
    """Many tasks over one frozen weight: row t of x uses ``mask_bits_stack[task_ids[t]]``
    (``[tasks, out, ceil(in / 32)]`` packed masks; task -1 = the unmasked weight). CUDA, up to 16
    rows: one pass over the weight, each row's mask applied on load; larger batches: one masked
    weight and product per task present. The ids' range is checked with one host read, which CUDA
    graph capture forbids: there an id outside [-1, tasks) is not an error but acts as -1 (the
    unmasked weight), and batches over 16 rows compute every task's product (slower). Forward only."""
    _checks.tensors(
        "masked_linear_multi",
        ("bias",),
        x=x,
        weight=weight,
        bias=bias,
        mask_bits_stack=mask_bits_stack,
        task_ids=task_ids,
    )
    return torch.ops.peftkern.masked_linear_multi(x, weight, bias, mask_bits_stack, task_ids)


@torch.library.register_fake("peftkern::masked_linear_forward")
def _masked_forward_fake(x, weight, bias, scores, threshold, save_for_backward):
    _checks.same_device("masked_linear", ("x", x), weight=weight, bias=bias, scores=scores)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    bits_shape = (weight.shape[0], (weight.shape[1] + 31) // 32) if save_for_backward else (0,)
    return out, weight.new_empty(bits_shape, dtype=torch.int32)


@torch.library.register_fake("peftkern::masked_linear_backward")
def _masked_backward_fake(grad_out, x, weight, scores, mask_bits, output_mask):
    like = (x, weight, weight.new_empty(weight.shape[:1]), scores)
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask))


@torch.library.register_fake("peftkern::pack_mask")
def _pack_fake(scores, threshold):
    return scores.new_empty((scores.shape[0], (scores.shape[1] + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("peftkern::unpack_mask")
def _unpack_fake(bits, shape):
    return bits.new_empty(tuple(shape), dtype=torch.bool)


@torch.library.register_fake("peftkern::masked_linear_packed")
def _packed_fake(x, weight, bias, mask_bits):
    _checks.same_device("masked_linear_packed", ("x", x), weight=weight, bias=bias, mask_bits=mask_bits)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("peftkern::masked_linear_multi")
def _multi_fake(x, weight, bias, mask_bits_stack, task_ids):
    _checks.same_device(
        "masked_linear_multi",
        ("x", x),
        weight=weight,
        bias=bias,
        mask_bits_stack=mask_bits_stack,
        task_ids=task_ids,
    )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _masked_setup_context(ctx, inputs, output):
    x, weight, _bias, scores, _threshold, _save = inputs
    ctx.save_for_backward(x, weight, scores, output[1])


def _masked_backward(ctx, grad_out, _grad_bits):
    x, weight, scores, bits = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:4]]  # x, weight, bias, scores
    grads = (None,) * 4
    if any(mask):
        grads = torch.ops.peftkern.masked_linear_backward(grad_out, x, weight, scores, bits, mask)
    return (*grads, None, None)


torch.library.register_autograd(
    "peftkern::masked_linear_forward", _masked_backward, setup_context=_masked_setup_context
)


def _inference_only(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"peftkern: {name} is forward only (serving); train masks with masked_linear")

    return backward


torch.library.register_autograd(
    "peftkern::masked_linear_packed",
    _inference_only("masked_linear_packed"),
    setup_context=lambda ctx, inputs, output: None,
)
torch.library.register_autograd(
    "peftkern::masked_linear_multi",
    _inference_only("masked_linear_multi"),
    setup_context=lambda ctx, inputs, output: None,
)
