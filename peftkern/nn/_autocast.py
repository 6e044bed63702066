"""The one autocast rule the modules share."""

import torch
from torch import Tensor


def autocast_tensors(x: Tensor, tensors):
    """The tensors in the autocast dtype where autocast is on for x's device (as nn.Linear computes);
    None entries stay None."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return [None if t is None else t.to(dt) for t in tensors]
    return list(tensors)
