"""peftkern.nn.MaskedLinear: mask tuning of a frozen linear layer on the fused op."""

import torch
from torch import Tensor, nn

from ..ops.mask import masked_linear, pack_mask
from . import _checks
from ._autocast import autocast_tensors
from ._frozen_base import init_like_linear_, share_frozen_base

# Piggyback (Mallya et al. 2018) initialises the real-valued mask at 1e-2 and binarises it at
# 5e-3, so the first binary mask keeps every weight and the masked model starts as the pretrained
# one; Zhao et al. (2020) fine-tune language models with the same scheme.
DEFAULT_THRESHOLD = 5e-3
DEFAULT_SCORE_INIT = 1e-2


class MaskedLinear(nn.Module):
    """``out = x @ (weight * (scores > threshold)).T + bias`` with the weight (and by default the
    bias) frozen and real-valued ``scores`` learned through a straight-through estimator.

    ``threshold`` (default 5e-3) and ``score_init`` (default 1e-2, every score starts there) follow
    Piggyback; with ``score_init > threshold`` the initial mask keeps every weight. ``scores`` are
    float32 by default (``scores_dtype``), or the weight's dtype.

    ``mask()`` the current bool mask, ``sparsity()`` the fraction masked out, ``bake()`` a plain
    ``nn.Linear`` with the masked weight, ``packed_mask()`` the mask as bits for
    ``masked_linear_packed`` / ``masked_linear_multi``. Under autocast x, weight and bias take the
    autocast dtype (scores stay in theirs).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        score_init: float = DEFAULT_SCORE_INIT,
        scores_dtype=torch.float32,
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_features = _checks.dim("MaskedLinear", "in_features", in_features)
        out_features = _checks.dim("MaskedLinear", "out_features", out_features)
        factory = _checks.factory("MaskedLinear", device, dtype)
        scores_dtype = _checks.float_dtype("MaskedLinear", "scores_dtype", scores_dtype, optional=False)
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.score_init = float(threshold), float(score_init)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.scores = nn.Parameter(
            torch.empty(out_features, in_features, device=factory["device"], dtype=scores_dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight and bias as nn.Linear initialises them; every score at score_init."""
        init_like_linear_(self.weight, self.bias)
        self.reset_scores()

    def reset_scores(self) -> None:
        with torch.no_grad():
            self.scores.fill_(self.score_init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "MaskedLinear":
        """Masks an existing nn.Linear: its weight and bias Parameters are shared (not copied) and
        frozen; the scores go on the weight's device."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs
        )
        share_frozen_base(layer, linear)
        layer.scores = nn.Parameter(torch.empty(w.shape, device=w.device, dtype=layer.scores.dtype))
        layer.reset_scores()
        return layer

    @torch.no_grad()
    def mask(self) -> Tensor:
        return self.scores.float() > self.threshold

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of the weights the mask drops."""
        return 1.0 - self.mask().float().mean().item()

    @torch.no_grad()
    def packed_mask(self) -> Tensor:
        return pack_mask(self.scores, self.threshold)

    @torch.no_grad()
    def bake(self) -> nn.Linear:
        """A plain nn.Linear computing this layer's current forward (the masked weight, copied)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.weight * self.mask())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias = autocast_tensors(x, [x, self.weight, self.bias])
        scores = self.scores if self.scores.dtype in (torch.float32, weight.dtype) else self.scores.float()
        return masked_linear(x, weight, bias, scores, threshold=self.threshold)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"threshold={self.threshold}, score_init={self.score_init}"
        )
