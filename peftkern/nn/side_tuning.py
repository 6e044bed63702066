"""peftkern.nn.SideTuning: a frozen base network blended with a small trainable side network
(Zhang et al. 2020, Side-Tuning)."""

import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

ALPHA_MODES = ("fixed", "learned", "schedule")


def _unit_interval(value, what, step=None):
    """value as a Python float in [0, 1]: a real number (not a bool), or a one-element real tensor."""
    where = "" if step is None else f" at step {step}"
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"SideTuning: {what} must be a float in [0, 1]; got {type(value).__name__} {value!r:.40}{where}"
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"SideTuning: {what} must be in [0, 1]; got {value}{where}")
    return value


class SideTuning(nn.Module):
    """Side-tuning (Zhang et al. 2020): ``out = alpha * base(*a, **kw) + (1 - alpha) * side(*a, **kw)``.

    ``base`` is frozen: ``requires_grad_(False)`` on construction, and it always runs under
    ``torch.no_grad()``, so no gradient reaches it (even if its parameters are unfrozen later) and
    it stores no activations for backward. ``side`` trains. Both receive the same arguments and must
    return tensors of the same shape (a TypeError / ValueError naming the base and side outputs
    otherwise). ``train()`` / ``eval()`` reach the base as usual: call ``base.eval()`` after
    ``train()`` to keep its dropout off.

    ``alpha``, one of:
      a float in [0, 1]  fixed blend weight;
      ``"learned"``      a parameter ``alpha_logit`` (float32 0-d), ``alpha = sigmoid(alpha_logit)``
                         (in float32, float64 for float64 outputs), starting at ``alpha_init`` (a
                         float in (0, 1), default 0.5);
      a callable         a schedule ``alpha(step) -> float in [0, 1]`` (the paper's curriculum, e.g.
                         ``lambda s: max(0.0, 1 - s / 1000)``), where ``step`` is the number of
                         training-mode forward calls made so far: 0 on the first, then 1, 2, ...;
                         eval-mode calls use the current step and do not advance it. The count is
                         the persistent int64 buffer ``step`` (0-d; saved in the state dict so a
                         resumed run continues the schedule; read on the host at each forward, one
                         small device-to-host copy when the module lives on a GPU). A value
                         outside [0, 1] raises ValueError at that forward (the step does not advance).

    ``alpha_value()`` returns the alpha the next forward uses (a float, or the sigmoid tensor).
    """

    def __init__(
        self,
        base: nn.Module,
        side: nn.Module,
        alpha: Union[float, str, Callable[[int], float]] = 0.5,
        *,
        alpha_init: Optional[float] = None,
    ):
        super().__init__()
        for name, m in (("base", base), ("side", side)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"SideTuning: {name} must be an nn.Module; got {type(m).__name__}")
        if base is side:
            raise ValueError("SideTuning: base and side must be different modules (base is frozen)")
        if isinstance(alpha, str):
            if alpha != "learned":
                raise ValueError(
                    f"SideTuning: alpha must be a float in [0, 1], 'learned' or a callable; got {alpha!r:.40}"
                )
            mode = "learned"
        elif callable(alpha):
            mode = "schedule"
        elif isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(
                "SideTuning: alpha must be a float in [0, 1], 'learned' or a callable; got "
                f"{type(alpha).__name__} {alpha!r:.40}"
            )
        else:
            mode = "fixed"
            alpha = _unit_interval(alpha, "alpha")
        if alpha_init is not None and mode != "learned":
            raise ValueError("SideTuning: alpha_init is only used with alpha='learned'")
        self.base = base.requires_grad_(False)
        self.side = side
        self.alpha_mode = mode
        self.schedule: Optional[Callable[[int], float]] = alpha if mode == "schedule" else None
        self._fixed_alpha: Optional[float] = alpha if mode == "fixed" else None
        if mode == "learned":
            a0 = 0.5 if alpha_init is None else alpha_init
            if isinstance(a0, bool) or not isinstance(a0, numbers.Real):
                raise TypeError(
                    f"SideTuning: alpha_init must be a float in (0, 1); got {type(a0).__name__} {a0!r:.40}"
                )
            a0 = float(a0)
            if not 0.0 < a0 < 1.0:
                raise ValueError(f"SideTuning: alpha_init must be in (0, 1); got {a0}")
            device = next(side.parameters(), torch.empty(0)).device
            self.alpha_logit = nn.Parameter(
                torch.tensor(math.log(a0 / (1.0 - a0)), dtype=torch.float32, device=device)
            )
        if mode == "schedule":
            self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=True)

    def alpha_value(self) -> Union[float, Tensor]:
        """The alpha the next forward uses: a float (fixed, schedule at the current step) or the
        0-d tensor sigmoid(alpha_logit) (learned)."""
        if self.alpha_mode == "fixed":
            return self._fixed_alpha
        if self.alpha_mode == "learned":
            return torch.sigmoid(self.alpha_logit)
        step = int(self.step)
        return _unit_interval(self.schedule(step), "alpha (the schedule's value)", step)

    def forward(self, *args, **kwargs) -> Tensor:
        alpha = None if self.alpha_mode == "learned" else self.alpha_value()
        with torch.no_grad():
            base_out = self.base(*args, **kwargs)
        side_out = self.side(*args, **kwargs)
        for name, t in (("base", base_out), ("side", side_out)):
            if not isinstance(t, Tensor):
                raise TypeError(f"SideTuning: {name} must return a tensor; got {type(t).__name__}")
        if base_out.shape != side_out.shape:
            raise ValueError(
                f"SideTuning: base and side outputs must have the same shape; got base "
                f"{list(base_out.shape)} and side {list(side_out.shape)}"
            )
        if self.alpha_mode == "schedule" and self.training:
            self.step.add_(1)
        if alpha is None:  # the sigmoid in float32, or in float64 for float64 outputs
            logit = self.alpha_logit
            alpha = torch.sigmoid(logit.to(torch.promote_types(logit.dtype, side_out.dtype)))
        return alpha * base_out + (1 - alpha) * side_out

    def extra_repr(self) -> str:
        if self.alpha_mode == "fixed":
            return f"alpha={self._fixed_alpha}"
        if self.alpha_mode == "learned":
            return "alpha='learned'"
        return f"alpha=schedule {getattr(self.schedule, '__name__', type(self.schedule).__name__)}"
