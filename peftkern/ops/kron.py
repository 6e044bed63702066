"""KronA's linear layer, ``out = x Wᵀ + b + s · x (A ⊗ B)ᵀ``, without forming ``A ⊗ B``.

With ``torch.kron``'s convention, ``(A ⊗ B)[i·out_b + k, j·in_b + l] = A[i, j] · B[k, l]``. A row x of
``in = in_a · in_b`` features, read row-major as ``X [in_a, in_b]`` (``X[j, l] = x[j·in_b + l]``), so
maps to ``Y = A · X · Bᵀ`` ``[out_a, out_b]``, read row-major as the ``out = out_a · out_b`` outputs.

Per call, T rows, ``[out, in]`` base (e.g. 4096 -> 4096 with 64 x 64 factors, bf16):

==========================  ===================================  ==========================================
                            peft's LoKr (forms ``kron(w1, w2)``)  ``krona_linear``
==========================  ===================================  ==========================================
forward flops               base 2·T·in·out + 2·T·in·out          base + 2·T·in·out_b + 2·T·in_a·out
                            (a second full GEMM) + out·in         (``Z = X Bᵀ``, ``A Z``: 3 % of the base at
                            (forming the Kronecker product)       64 x 64, against 100 %)
forward bytes beyond base   writes and reads ``[out, in]``       reads A, B; ``Z [T, in_a, out_b]`` written
                            (32 MiB) + a second ``[T, out]``      once and read once (transient); Y added
                            output and the add                    into the base output in place (baddbmm)
saved for backward          x (twice: base and delta GEMM)        x, A, B (``Z`` recomputed: it is as big as
                            and ``kron(w1, w2)`` ``[out, in]``    x at 64 x 64, 2·T·in·out_b flops to redo)
backward flops              dX through ``[out, in]``              ``V = Aᵀ G`` and ``Z``: 2·T·out·in_a and
                            (2·T·in·out), dW_kron = Gᵀ x          2·T·in·out_b; dX += V B (2·T·in·out_b);
                            (2·T·in·out), then its reduction      dB = Vᵀ X, dA = Σ_t G_t Z_tᵀ (2·T·in·out_b
                            to dw1, dw2                           and 2·T·out·in_a): ~6 % of one base GEMM
==========================  ===================================  ==========================================

So KronA adds ~3 % to the base's forward flops and ~6 % to its backward, and no ``[out, in]``
tensor, where peft's way doubles both. The op is a ``torch.library.custom_op`` with its own
backward (``register_autograd``) so that ``Z`` is recomputed rather than saved, and the fake
(``register_fake``) gives ``torch.compile`` its shape; inside, ATen GEMMs (cuBLAS on CUDA), no
hand-written kernel. The base weight gets a gradient only when it requires one (frozen: no work).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks


def _check(x, weight, bias, kron_A, kron_B, scaling):
    op = "krona_linear"
    _checks.tensors(op, ("bias",), x=x, weight=weight, bias=bias, kron_A=kron_A, kron_B=kron_B)
    scaling = _checks.real(op, "scaling", scaling)
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., in_features]; got a 0-d tensor")
    for name, t in (("weight", weight), ("kron_A", kron_A), ("kron_B", kron_B)):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D matrix; got shape {tuple(t.shape)}")
    n_out, n_in = weight.shape
    (out_a, in_a), (out_b, in_b) = kron_A.shape, kron_B.shape
    if out_a * out_b != n_out or in_a * in_b != n_in:
        raise ValueError(
            f"{op}: kron_A {tuple(kron_A.shape)} ⊗ kron_B {tuple(kron_B.shape)} is "
            f"[{out_a * out_b}, {in_a * in_b}]; weight is [{n_out}, {n_in}]"
        )
    if x.shape[-1] != n_in:
        raise ValueError(
            f"{op}: x must have shape [..., {n_in}] (weight's in_features); got {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"{op}: bias must have shape [{n_out}] (out_features); got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("kron_A", kron_A), ("kron_B", kron_B)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have x's dtype {x.dtype}; got {t.dtype}")
    _checks.same_device(op, ("x", x), weight=weight, bias=bias, kron_A=kron_A, kron_B=kron_B)
    return scaling


def krona_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], kron_A: Tensor, kron_B: Tensor, *, scaling: float
) -> Tensor:
    """``out = x Wᵀ + b + scaling · x (kron_A ⊗ kron_B)ᵀ`` for x ``[..., in]``, weight ``[out, in]``,
    bias ``[out]`` or None, kron_A ``[out_a, in_a]``, kron_B ``[out_b, in_b]`` with
    ``out = out_a·out_b`` and ``in = in_a·in_b`` (``torch.kron``'s index convention). All of x's dtype
    and device; the result has x's shape but its last dimension ``out``. Gradients to x, weight, bias,
    kron_A and kron_B (those that require one). ``[out, in]`` is never formed (the module docstring
    counts the flops and bytes)."""
    scaling = _check(x, weight, bias, kron_A, kron_B, scaling)
    return torch.ops.peftkern.krona_linear(x, weight, bias, kron_A, kron_B, scaling)


@torch.library.custom_op("peftkern::krona_linear", mutates_args=())
def _krona_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], kron_A: Tensor, kron_B: Tensor, scaling: float
) -> Tensor:
    lead, n_in = x.shape[:-1], x.shape[-1]
    (out_a, in_a), (out_b, in_b) = kron_A.shape, kron_B.shape
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    out = F.linear(x2, weight, bias)
    if rows and out.numel():
        z = torch.mm(x2.reshape(rows * in_a, in_b), kron_B.t()).view(rows, in_a, out_b)  # X Bᵀ
        # A Z added into the base output in place (A broadcast over the rows, no copy)
        out.view(rows, out_a, out_b).baddbmm_(kron_A.expand(rows, out_a, in_a), z, alpha=scaling)
    return out.view(*lead, out_a * out_b)


@_krona_linear.register_fake
def _(x, weight, bias, kron_A, kron_B, scaling):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, kron_A, kron_B, scaling = inputs
    ctx.save_for_backward(x, weight, kron_A, kron_B)
    ctx.scaling, ctx.has_bias = scaling, bias is not None


def _backward(ctx, grad):
    x, weight, kron_A, kron_B = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    s = ctx.scaling
    n_in = x.shape[-1]
    (out_a, in_a), (out_b, in_b) = kron_A.shape, kron_B.shape
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    g2 = grad.reshape(rows, out_a * out_b)
    g3 = g2.view(rows, out_a, out_b)
    gx = gw = gb = gA = gB = None
    if need_x or need_B:
        # V = Aᵀ G per row, [rows, in_a, out_b]: serves dX (V B) and dB (Vᵀ X)
        v = torch.bmm(kron_A.t().expand(rows, in_a, out_a), g3).reshape(rows * in_a, out_b)
        if need_x:
            gx = torch.mm(g2, weight)
            gx.view(rows * in_a, in_b).addmm_(v, kron_B, alpha=s)
            gx = gx.view(x.shape)
        if need_B:
            gB = torch.mm(v.t(), x2.reshape(rows * in_a, in_b)).mul_(s)
    if need_A:
        z = torch.mm(x2.reshape(rows * in_a, in_b), kron_B.t()).view(rows, in_a, out_b)  # recomputed
        gA = torch.einsum("tik,tjk->ij", g3, z).mul_(s)
    if need_w:
        gw = torch.mm(g2.t(), x2)
    if need_b and ctx.has_bias:
        gb = g2.sum(0)
    return gx, gw, gb, gA, gB, None


_krona_linear.register_autograd(_backward, setup_context=_setup_context)


def kron_delta(x: Tensor, kron_A: Tensor, kron_B: Tensor, scaling: float) -> Tensor:
    """``scaling · x (kron_A ⊗ kron_B)ᵀ`` alone, as a composite of ATen matmuls (autograd's backward):
    what a second active KronA, or a mixed batch's rows, add to the output (slower than the op)."""
    lead = x.shape[:-1]
    (out_a, in_a), (out_b, in_b) = kron_A.shape, kron_B.shape
    X = x.reshape(-1, in_a, in_b)
    y = torch.matmul(kron_A, torch.matmul(X, kron_B.t()))  # [T, out_a, out_b]
    return (y * scaling).reshape(*lead, out_a * out_b)
