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
    gate: Optional[Tensor] = None,
) -> Tensor:
    """Bottleneck adapter in one fused pass::

        h   = act(x @ w_down.T + b_down)                                   # [..., r]
        out = (x if residual is None else residual) + scale * g * (h @ w_up.T + b_up)
        g   = gate[..., None]                                              # 1 when gate is None

    x ``[..., d]``; w_down ``[r, d]``; b_down ``[r]`` or None; w_up ``[d, r]``; b_up ``[d]`` or None;
    residual ``[..., d]`` or None (AdaptFormer's parallel adapter: the adapter reads x, the residual
    is another tensor). ``activation``: ``gelu`` (erf), ``gelu_tanh``, ``relu`` or ``silu``.
    ``gate`` ``[...]`` (x.shape[:-1]) or None: a per-row scale of the adapter's output, such as
    UniPELT's ``sigmoid(x @ w_g.T + b_g)``; its gradient comes from the adapter's backward.
    All tensors share x's dtype and device. Math accumulates in float32 (float64 for float64).

    Gradients flow to every input that requires one. CUDA: fused kernels for float32, float16 and
    bfloat16 with r <= 256; float64 or larger r run an unfused (slow) composite.
    """
    _checks.tensors(
        "adapter",
        ("b_down", "b_up", "residual", "gate"),
        x=x,
        w_down=w_down,
        b_down=b_down,
        w_up=w_up,
        b_up=b_up,
        residual=residual,
        gate=gate,
    )
    activation = _checks.string("adapter", "activation", activation)
    scale = _checks.real("adapter", "scale", scale)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_down, b_down, w_up, b_up, residual, gate)
    )
    out, _ = torch.ops.peftkern.adapter_forward(
        x, w_down, b_down, w_up, b_up, residual, activation, scale, save, gate
    )
    return out


@torch.library.register_fake("peftkern::adapter_forward")
def _adapter_forward_fake(
    x, w_down, b_down, w_up, b_up, residual, activation, scale, save_bottleneck, gate=None
):
    _checks.same_device(
        "adapter",
        ("x", x),
        w_down=w_down,
        b_down=b_down,
        w_up=w_up,
        b_up=b_up,
        residual=residual,
        gate=gate,
    )
    out = x.new_empty(x.shape)
    z = x.new_empty((*x.shape[:-1], w_down.shape[0])) if save_bottleneck else x.new_empty((0,))
    return out, z


@torch.library.register_fake("peftkern::adapter_backward")
def _adapter_backward_fake(
    grad_out,
    x,
    bottleneck,
    w_down,
    w_up,
    activation,
    scale,
    residual_is_x,
    output_mask,
    gate=None,
    b_up=None,
    gate_grad=False,
):
    shapes = (x.shape, w_down.shape, w_down.shape[:1], w_up.shape, w_up.shape[:1], x.shape[:-1])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, [*output_mask, gate_grad]))


def _adapter_setup_context(ctx, inputs, output):
    x, w_down, _b_down, w_up, b_up, residual, activation, scale, _save, *rest = inputs
    gate = rest[0] if rest else None
    # b_up only for the gate's gradient (d out / d gate has a b_up term)
    ctx.save_for_backward(x, w_down, w_up, output[1], gate, b_up if gate is not None else None)
    ctx.activation, ctx.scale, ctx.residual_is_x = activation, scale, residual is None


def _adapter_backward(ctx, grad_out, _grad_bottleneck):
    x, w_down, w_up, z, gate, b_up = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(n) for n in need[:5]]  # x, w_down, b_down, w_up, b_up
    gate_grad = len(need) > 9 and bool(need[9])
    grads = (None,) * 6
    if any(mask) or gate_grad:
        grads = torch.ops.peftkern.adapter_backward(
            grad_out,
            x,
            z,
            w_down,
            w_up,
            ctx.activation,
            ctx.scale,
            ctx.residual_is_x,
            mask,
            gate,
            b_up,
            gate_grad,
        )
    grad_residual = grad_out if need[5] else None
    return (*grads[:5], grad_residual, None, None, None, grads[5])


torch.library.register_autograd(
    "peftkern::adapter_forward", _adapter_backward, setup_context=_adapter_setup_context
)


def adapter_multi(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    adapter_ids: Tensor,
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """L bottleneck adapters in one batch, each token its own (many tasks served from one model)::

        i      = adapter_ids[t]
        out[t] = res[t] + scale * (act(x[t] @ w_down[i].T + b_down[i]) @ w_up[i].T + b_up[i])
        out[t] = res[t]                                                  where i == -1
        res    = x if residual is None else residual

    x ``[..., d]`` (tokens = x.numel() / d); w_down ``[L, r, d]``; b_down ``[L, r]`` or None;
    w_up ``[L, d, r]``; b_up ``[L, d]`` or None; adapter_ids ``[tokens]`` int32/int64 in [-1, L);
    residual ``[..., d]`` or None. ``activation`` as in :func:`adapter`.

    CUDA forward: tokens are grouped by adapter on the device (no host sync), then one fused kernel
    runs each 64-token block through its adapter, reading that adapter's weights once per block;
    the tokens of no adapter are copied by their own blocks (float32/float16/bfloat16, r <= 256).
    The ids' range is checked with one host read (skipped inside CUDA graph capture, where ids out
    of range act as -1). The backward (to x, the stacked weights, the biases and the residual) and
    the CPU path are a slower per-adapter composite: it reads the per-adapter token counts on the
    host, or under capture masks every row once per adapter (slower still).
    """
    _checks.tensors(
        "adapter_multi",
        ("b_down", "b_up", "residual"),
        x=x,
        w_down=w_down,
        b_down=b_down,
        w_up=w_up,
        b_up=b_up,
        adapter_ids=adapter_ids,
        residual=residual,
    )
    activation = _checks.string("adapter_multi", "activation", activation)
    scale = _checks.real("adapter_multi", "scale", scale)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_down, b_down, w_up, b_up, residual)
    )
    out, _ = torch.ops.peftkern.adapter_multi_forward(
        x, w_down, b_down, w_up, b_up, adapter_ids, residual, activation, scale, save
    )
    return out


@torch.library.register_fake("peftkern::adapter_multi_forward")
def _adapter_multi_forward_fake(
    x, w_down, b_down, w_up, b_up, adapter_ids, residual, activation, scale, save_bottleneck
):
    _checks.same_device(
        "adapter_multi",
        ("x", x),
        w_down=w_down,
        b_down=b_down,
        w_up=w_up,
        b_up=b_up,
        adapter_ids=adapter_ids,
        residual=residual,
    )
    z = x.new_empty((*x.shape[:-1], w_down.shape[1])) if save_bottleneck else x.new_empty((0,))
    return x.new_empty(x.shape), z


@torch.library.register_fake("peftkern::adapter_multi_backward")
def _adapter_multi_backward_fake(
    grad_out, x, bottleneck, w_down, w_up, adapter_ids, activation, scale, residual_is_x, output_mask
):
    shapes = (x.shape, w_down.shape, w_down.shape[:2], w_up.shape, w_up.shape[:2])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _adapter_multi_setup_context(ctx, inputs, output):
    x, w_down, _b_down, w_up, _b_up, adapter_ids, residual, activation, scale, _save = inputs
    ctx.save_for_backward(x, w_down, w_up, adapter_ids, output[1])
    ctx.activation, ctx.scale, ctx.residual_is_x = activation, scale, residual is None


def _adapter_multi_backward(ctx, grad_out, _grad_bottleneck):
    x, w_down, w_up, adapter_ids, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(n) for n in need[:5]]  # x, w_down, b_down, w_up, b_up
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.adapter_multi_backward(
            grad_out, x, z, w_down, w_up, adapter_ids, ctx.activation, ctx.scale, ctx.residual_is_x, mask
        )
    grad_residual = grad_out if need[6] else None
    return (*grads, None, grad_residual, None, None, None)


torch.library.register_autograd(
    "peftkern::adapter_multi_forward", _adapter_multi_backward, setup_context=_adapter_multi_setup_context
)


def adapter_stack(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
) -> Tensor:
    """N bottleneck adapters on the same tokens, stacked (AdapterFusion's inputs); no residual::

        out[..., n, :] = scale * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n])   # [..., N, d]

    x ``[..., d]``; w_down ``[N, r, d]``; b_down ``[N, r]`` or None; w_up ``[N, d, r]``; b_up
    ``[N, d]`` or None. x is read once for all N adapters: the down-projections are one product
    with the ``[N * r, d]`` stacked weight, the up-projections one batched product writing each
    adapter's output once (cuBLAS on CUDA; the rank-``N * r`` bottleneck is the only extra traffic).
    Saved for the backward: x and the bottleneck ``[..., N, r]``; gradients flow to every input.
    """
    _checks.tensors(
        "adapter_stack", ("b_down", "b_up"), x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up
    )
    activation = _checks.string("adapter_stack", "activation", activation)
    scale = _checks.real("adapter_stack", "scale", scale)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_down, b_down, w_up, b_up)
    )
    out, _ = torch.ops.peftkern.adapter_stack_forward(x, w_down, b_down, w_up, b_up, activation, scale, save)
    return out


@torch.library.register_fake("peftkern::adapter_stack_forward")
def _adapter_stack_forward_fake(x, w_down, b_down, w_up, b_up, activation, scale, save_bottleneck):
    _checks.same_device("adapter_stack", ("x", x), w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    lead, (n, r) = x.shape[:-1], w_down.shape[:2]
    z = x.new_empty((*lead, n, r)) if save_bottleneck else x.new_empty((0,))
    return x.new_empty((*lead, n, x.shape[-1])), z


@torch.library.register_fake("peftkern::adapter_stack_backward")
def _adapter_stack_backward_fake(grad_out, x, bottleneck, w_down, w_up, activation, scale, output_mask):
    shapes = (x.shape, w_down.shape, w_down.shape[:2], w_up.shape, w_up.shape[:2])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _adapter_stack_setup_context(ctx, inputs, output):
    x, w_down, _b_down, w_up, _b_up, activation, scale, _save = inputs
    ctx.save_for_backward(x, w_down, w_up, output[1])
    ctx.activation, ctx.scale = activation, scale


def _adapter_stack_backward(ctx, grad_out, _grad_bottleneck):
    x, w_down, w_up, z = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = (None,) * 5
    if any(mask):
        grads = torch.ops.peftkern.adapter_stack_backward(
            grad_out, x, z, w_down, w_up, ctx.activation, ctx.scale, mask
        )
    return (*grads, None, None, None)


torch.library.register_autograd(
    "peftkern::adapter_stack_forward", _adapter_stack_backward, setup_context=_adapter_stack_setup_context
)
