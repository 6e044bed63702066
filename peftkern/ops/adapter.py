"""The fused bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020; AdaptFormer)."""

from typing import Optional

import torch
from torch import Tensor

from . import _checks

ADAPTER_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Bottleneck adapter in one fused pass::

        h   = act(x @ w_down.T + b_down)                                   # [..., r]
        out = (x if residual is None else residual) + scale * (h @ w_up.T + b_up)

    x ``[..., d]``; w_down ``[r, d]``; b_down ``[r]`` or None; w_up ``[d, r]``; b_up ``[d]`` or None;
    residual ``[..., d]`` or None (AdaptFormer's parallel adapter: the adapter reads x, the residual
    is another tensor). ``activation``: ``gelu`` (erf), ``gelu_tanh``, ``relu`` or ``silu``.
    All tensors share x's dtype and device. Math accumulates in float32 (float64 for float64).

    Gradients flow to every input that requires one. CUDA: fused kernels for float32, float16 and
    bfloat16 with r <= 256; float64 or larger r run an unfused (slow) composite.
    """
    _checks.tensors(
        "adapter",
        ("b_down", "b_up", "residual"),
        x=x,
        w_down=w_down,
        b_down=b_down,
        w_up=w_up,
        b_up=b_up,
        residual=residual,
    )
    activation = _checks.string("adapter", "activation", activation)
    scale = _checks.real("adapter", "scale", scale)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_down, b_down, w_up, b_up, residual)
    )
    out, _ = torch.ops.peftkern.adapter_forward(
        x, w_down, b_down, w_up, b_up, residual, activation, scale, save
    )
    return out


@torch.library.register_fake("peftkern::adapter_forward")
def _adapter_forward_fake(x, w_down, b_down, w_up, b_up, residual, activation, scale, save_bottleneck):
    _checks.same_device(
        "adapter", ("x", x), w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=residual
    )
    out = x.new_empty(x.shape)
    z = x.new_empty((*x.shape[:-1], w_down.shape[0])) if save_bottleneck else x.new_empty((0,))
    return out, z


@torch.library.register_fake("peftkern::adapter_backward")
def _adapter_backward_fake(
    grad_out, x, bottleneck, w_down, w_up, activation, scale, residual_is_x, output_mask
):
    shapes = (x.shape, w_down.shape, w_down.shape[:1], w_up.shape, w_up.shape[:1])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _adapter_setup_context(ctx, inputs, output):
    x, w_down, _b_down, w_up, _b_up, residual, activation, scale, _save = inputs
    ctx.save_for_backward(x, w_down, w_up, output[1])
    ctx.activation, ctx.scale, ctx.residual_is_x = activation, scale, residual is None


def _adapter_backward(ctx, grad_out, _grad_bottleneck):
    x, w_down, w_up, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(n) for n in need[:5]]  # x, w_down, b_down, w_up, b_up
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.adapter_backward(
            grad_out, x, z, w_down, w_up, ctx.activation, ctx.scale, ctx.residual_is_x, mask
        )
    grad_residual = grad_out if need[5] else None
    return (*grads, grad_residual, None, None, None)


torch.library.register_autograd(
    "peftkern::adapter_forward", _adapter_backward, setup_context=_adapter_setup_context
)
