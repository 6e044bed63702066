"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") as one op: a learned vector rescales a linear layer's output (keys, values) or
its input (the FFN's down projection), exactly as Hugging Face peft's IA3 computes it."""

from typing import Optional

import torch
from torch import Tensor

from . import _checks


def ia3_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_scale: Tensor, *, scale_input: bool
) -> Tensor:
    """(IA)^3 linear layer::

        scale_input=False (l = ia3_scale [out]):  out = l * (x @ weight.T + bias)      # keys, values
        scale_input=True  (l = ia3_scale [in]):   out = (l * x) @ weight.T + bias      # FFN down-proj

        output scale:  d x = g @ (l[:, None] * weight)     d l[j] = sum_t out[t, j] g[t, j] / l[j]
        input scale:   d h = g @ weight,  d x = d h * l    d l    = sum_t x[t] * d h[t]

    with g = d out, sums over all rows t of ``x.reshape(-1, in)``; the bias is scaled with the
    output for the output scale, as peft scales ``base_layer(x)`` and merges into the bias.
    x ``[..., in]``; weight ``[out, in]`` (usually frozen); bias ``[out]`` or None; ia3_scale 1-D
    (peft's ``ia3_l`` ``[out, 1]`` / ``[1, in]`` flattened), x's dtype. Gradients flow to every input
    that requires one (weight and bias by an ATen composite).

    Forward: l is folded into the GEMM (``F.linear(x, l[:, None] * W, l * b)``: the product's rows
    come out scaled; ``F.linear(x, W * l, b)`` for the input), which costs a pass over ``[out, in]``;
    when the rows are fewer than the features (decode) the activation is scaled instead (a pass over
    ``[rows, out]`` or ``[rows, in]``), whichever moves fewer bytes. Both are exact. Saved for the
    backward: x, weight, bias, l and, for the output scale, the op's OUTPUT (which the next op keeps
    anyway) instead of the unscaled ``x @ W.T + b`` that eager autograd keeps (``[rows, out]`` more).

    Bytes beyond the GEMMs (e the element size; T rows):

    ============================  ===================================  ======================================
    pass                          eager ``F.linear(x, W, b) * l``      peftkern
    ============================  ===================================  ======================================
    output scale, forward         2 T out e (the multiply)             2 out in e (fold; T < in: 2 T out e)
    output scale, backward        5 T out e (g l, then sum(g z))       2 out in e (fold) + 2 T out e (d l)
    input scale, forward          2 T in e (x * l)                     2 out in e (fold; T < out: 2 T in e)
    input scale, backward         6 T in e (dh l, then sum(x dh))      3 T in e (one pass: d x in place, d l)
    ============================  ===================================  ======================================

    CUDA (float32/16/bf16): GEMMs through cuBLAS; d l by hand-written column reductions (float32
    accumulation, a fixed row split, deterministic; no host sync, graph-capture safe). The division
    by l is undefined where l = 0, imprecise where l is subnormal in its dtype (below float16's 2^-14,
    float32's ``FLT_MIN``), and wrong where l is inf or NaN: those columns are recomputed exactly as
    ``sum_t g[t, j] (x[t] . W[j] + b[j])`` by kernels launched every backward that exit at once for
    the others (a CTA per column and row split); a rescued column costs a pass over x (slow per
    rescued column, meant for the rare zero). Where ``l * z`` overflows the dtype the output is
    already inf, and so is d l. CPU and float64: the same math in ATen (float64 on CUDA recomputes z
    for every column rather than read l on the host). The output is saved: modifying it in place
    before the backward raises autograd's version-counter error (eager's ``z * l`` would not).
    Deterministic for a given GPU model (the row splits follow its SM count).
    """
    _checks.tensors("ia3_linear", ("bias",), x=x, weight=weight, bias=bias, ia3_scale=ia3_scale)
    if not isinstance(scale_input, bool):
        raise TypeError(
            f"ia3_linear: scale_input must be a bool; got {type(scale_input).__name__} {scale_input!r:.40}"
        )
    return torch.ops.peftkern.ia3_linear_forward(x, weight, bias, ia3_scale, scale_input)


@torch.library.register_fake("peftkern::ia3_linear_forward")
def _ia3_forward_fake(x, weight, bias, ia3_scale, scale_input):
    _checks.same_device("ia3_linear", ("x", x), weight=weight, bias=bias, ia3_scale=ia3_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("peftkern::ia3_linear_backward")
def _ia3_backward_fake(grad_out, x, weight, bias, ia3_scale, out, scale_input, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:1], ia3_scale.shape)
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _ia3_setup_context(ctx, inputs, output):
    x, weight, bias, ia3_scale, scale_input = inputs
    ctx.scale_input = scale_input
    # the output scale's d l reads the output; the input scale needs none
    ctx.save_for_backward(x, weight, bias, ia3_scale, None if scale_input else output)


def _ia3_backward(ctx, grad_out):
    x, weight, bias, ia3_scale, out = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:4]]  # x, weight, bias, ia3_scale
    grads = (None,) * 4
    if any(mask):
        if out is None:
            out = x.new_empty((0,))
        grads = torch.ops.peftkern.ia3_linear_backward(
            grad_out, x, weight, bias, ia3_scale, out, ctx.scale_input, mask
        )
    return (*grads, None)


torch.library.register_autograd(
    "peftkern::ia3_linear_forward", _ia3_backward, setup_context=_ia3_setup_context
)
