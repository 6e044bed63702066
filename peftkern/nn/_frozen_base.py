"""The frozen base linear that LoRALinear and MaskedLinear share with the layer they adapt."""

import math

import torch
from torch import nn


@torch.no_grad()
def init_like_linear_(weight: torch.Tensor, bias) -> None:
    """nn.Linear's initialisation: weight Kaiming-uniform (a = sqrt(5)), bias U(-1/sqrt(in), 1/sqrt(in))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


def share_frozen_base(layer: nn.Module, linear: nn.Linear) -> None:
    """Points layer.weight / layer.bias at linear's Parameters (shared, not copied) and freezes them."""
    layer.weight = linear.weight.requires_grad_(False)
    layer.bias = None if linear.bias is None else linear.bias.requires_grad_(False)
