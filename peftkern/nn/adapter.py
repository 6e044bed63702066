"""peftkern.nn.Adapter: a bottleneck adapter module on the fused op."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.adapter import ADAPTER_ACTIVATIONS, adapter
from . import _checks

ADAPTER_INITS = ("houlsby", "lora")


class Adapter(nn.Module):
    """Bottleneck adapter ``out = residual + scale * up(act(down(x)))``, one fused op.

    ``forward(x, residual=None)``: the residual defaults to x (Houlsby / Pfeiffer); pass another
    tensor for a parallel adapter (AdaptFormer: the adapter reads the block input and its output is
    added to another branch).

    Parameters live in two ``nn.Linear`` holders, ``down`` (weight ``[bottleneck, d_model]``) and
    ``up`` (weight ``[d_model, bottleneck]``), so the state dict of an eager down/up adapter loads
    as is. Their ``forward`` is never called.

    init:
      ``"houlsby"``  near-identity (Houlsby et al. 2019): down weight ~ N(0, 0.01^2) truncated at
                     two standard deviations, up weight and both biases zero, so out == residual.
      ``"lora"``     down weight Kaiming-uniform (a = sqrt(5), as nn.Linear), up and biases zero.

    Under autocast the adapter computes in the autocast dtype, as nn.Linear would.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        *,
        activation: str = "gelu",
        scale: float = 1.0,
        init: str = "houlsby",
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model, bottleneck = (
            _checks.dim("Adapter", "d_model", d_model),
            _checks.dim("Adapter", "bottleneck", bottleneck),
        )
        factory = _checks.factory("Adapter", device, dtype)
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"Adapter: activation must be one of {ADAPTER_ACTIVATIONS}; got {activation!r}")
        if init not in ADAPTER_INITS:
            raise ValueError(f"Adapter: init must be one of {ADAPTER_INITS}; got {init!r}")
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scale, self.init = activation, float(scale), init
        self.down = nn.Linear(d_model, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, d_model, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "houlsby":
                nn.init.trunc_normal_(self.down.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        tensors = [x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, residual]
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            tensors = [None if t is None else t.to(dt) for t in tensors]
        x, w_down, b_down, w_up, b_up, residual = tensors
        return adapter(
            x, w_down, b_down, w_up, b_up, activation=self.activation, scale=self.scale, residual=residual
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
            f"scale={self.scale}, init={self.init!r}"
        )
