"""peftkern.nn.LoRALinear: a LoRA linear layer on the fused op."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.lora import lora_linear
from . import _checks
from ._autocast import autocast_tensors
from ._frozen_base import init_like_linear_, share_frozen_base


def _save_merged_flag(module, state_dict, prefix, local_metadata):
    if module.merged:
        state_dict[prefix + "merged"] = torch.tensor(True)


def _load_merged_flag(module, state_dict, prefix, *args):
    merged = state_dict.pop(prefix + "merged", None)
    module._merged = bool(merged) if merged is not None else False


class LoRALinear(nn.Module):
    """``out = x @ weight.T + bias + scaling * lora_B(lora_A(dropout(x)))`` with a frozen base.

    Parameters (the names Hugging Face peft's layers expose): ``weight [out, in]`` and ``bias`` (the
    base, frozen), ``lora_A [r, in]`` (Kaiming-uniform, a = sqrt(5)) and ``lora_B [out, r]`` (zeros),
    so the layer starts as the base layer. ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)``
    with ``use_rslora``; ``lora_alpha`` defaults to r (scaling 1). ``lora_dropout`` applies to the
    LoRA branch in training mode only.

    ``merge()`` folds the update into ``weight`` (delta computed in float32, then cast) so the
    forward is a plain linear; ``unmerge()`` takes it out again. The state dict of a merged layer
    also holds ``merged`` (a bool tensor), so loading it marks the layer merged instead of adding
    the update twice; an unmerged layer's holds just the four tensors. Under autocast the layer computes
    in the autocast dtype, as nn.Linear would.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_features = _checks.dim("LoRALinear", "in_features", in_features)
        out_features = _checks.dim("LoRALinear", "out_features", out_features)
        r = _checks.dim("LoRALinear", "r", r)
        lora_dropout = _checks.probability("LoRALinear", "lora_dropout", lora_dropout)
        factory = _checks.factory("LoRALinear", device, dtype)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.use_rslora = use_rslora
        self.lora_dropout = float(lora_dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self._merged = False
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_merged_flag)
        self.register_load_state_dict_pre_hook(_load_merged_flag)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def merged(self) -> bool:
        return self._merged

    def reset_parameters(self) -> None:
        """Base as nn.Linear initialises it; LoRA as peft: A Kaiming-uniform(a=sqrt(5)), B zero."""
        init_like_linear_(self.weight, self.bias)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self._merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, **kwargs) -> "LoRALinear":
        """Wraps an existing nn.Linear: its weight and bias Parameters are shared (not copied) and
        frozen; the LoRA factors take the weight's device and dtype."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, r, bias=linear.bias is not None, device="meta", **kwargs
        )
        share_frozen_base(layer, linear)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    def _delta(self) -> Tensor:
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """A new tensor: weight + scaling * lora_B @ lora_A (in float32, then cast), or a copy of
        weight if the layer is merged already."""
        if self._merged:
            return self.weight.detach().clone()
        return (self.weight.float() + self._delta()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """weight += scaling * lora_B @ lora_A (in float32, then cast); forward becomes a plain linear."""
        if self._merged:
            return
        self.weight.copy_(self.merged_weight())
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        self.weight.copy_((self.weight.float() - self._delta()).to(self.weight.dtype))
        self._merged = False

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, lora_A, lora_B = autocast_tensors(
            x, [x, self.weight, self.bias, self.lora_A, self.lora_B]
        )
        if self._merged:
            return nn.functional.linear(x, weight, bias)
        return lora_linear(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            scaling=self.scaling,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
            f"bias={self.bias is not None}, merged={self._merged}"
        )
